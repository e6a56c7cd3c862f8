//! Tensor data: values drawn from seeded random streams, encoded in each tensor's type and written in chunks.

use std::io;

use gguf::GgmlType;

use super::rng::Rng;
use super::tensors::{Init, TensorSpec};
use super::{Fill, Generation, Streams, TinyError};
use crate::model::sizes::expert_tensor_layer;

/// The bytes of one tensor in its type, made in one piece. Every tensor has its own random stream (seed and name),
/// so a tensor's values do not depend on which other tensors the configuration has.
fn tensor_bytes(spec: &TensorSpec, seed: u64, streams: &Streams) -> Result<Vec<u8>, TinyError> {
    match tensor_values_with(spec, seed, streams) {
        Values::Ids(ids) => Ok(ids.into_iter().flat_map(i32::to_le_bytes).collect()),
        Values::F32(values) => encode(&spec.name, spec.ty, &values, spec.dims[0] as usize),
    }
}

/// Bytes of one tensor's data in its type.
pub(super) fn spec_bytes(spec: &TensorSpec) -> u64 {
    spec.ty.tensor_bytes(&spec.dims).unwrap_or(0)
}

/// The tensor's bytes as zeros, in pieces of 8 MiB (each all-zero block becomes a hole in a sparse file).
fn write_zeros(
    spec: &TensorSpec,
    out: &mut dyn io::Write,
    report: &mut dyn FnMut(u64, bool) -> Result<(), Fill>,
) -> Result<(), Fill> {
    let n_bytes = spec_bytes(spec);
    let piece = vec![0u8; (8usize << 20).min(n_bytes as usize)];
    let mut left = n_bytes;
    while left > 0 {
        let n = left.min(piece.len() as u64);
        out.write_all(&piece[..n as usize])?;
        left -= n;
        report(n, left == 0)?;
    }
    Ok(())
}

/// Writes one tensor's bytes to `out`: in one piece when it fits in a chunk (or holds ids), otherwise in chunks of
/// whole rows (whole blocks for block streams) on `generation.threads` threads, written in order. A one-stream
/// tensor's chunks are drawn in order from its stream on this thread, each handed to a thread to encode, so the
/// values are those of [`tensor_values`]; block-stream chunks are drawn and encoded on their threads. `report`
/// gets the bytes of each piece written and whether the tensor is complete; its error stops the writing.
pub(super) fn write_tensor(
    spec: &TensorSpec,
    seed: u64,
    generation: &Generation,
    out: &mut dyn io::Write,
    report: &mut dyn FnMut(u64, bool) -> Result<(), Fill>,
) -> Result<(), Fill> {
    if generation.zero_experts && expert_tensor_layer(&spec.name).is_some() {
        return write_zeros(spec, out, report);
    }
    let streams = &generation.streams;
    let n_per_row = spec.dims[0].max(1) as usize;
    let n_rows = (spec.dims.iter().product::<u64>() as usize) / n_per_row;
    let block_rows = streams.block_rows(spec);
    let chunk_rows = match block_rows {
        None => (generation.chunk_values / n_per_row).max(1),
        Some(b) => b * (generation.chunk_values / (b * n_per_row)).max(1),
    };
    if matches!(spec.init, Init::ExpertIds { .. }) || chunk_rows >= n_rows {
        let bytes = tensor_bytes(spec, seed, streams)?;
        out.write_all(&bytes)?;
        return report(bytes.len() as u64, true);
    }
    let threads = generation.thread_count().max(1);
    let encode_rows = |values: &[f32]| -> Result<Vec<u8>, TinyError> {
        encode(&spec.name, spec.ty, values, n_per_row)
    };
    let panicked = || TinyError::Type {
        tensor: spec.name.clone(),
        ty: spec.ty,
        detail: "a generation thread panicked".into(),
    };
    let mut rng = Rng::for_tensor(seed, &spec.name);
    let (n_chunks, mut n_written) = (n_rows.div_ceil(chunk_rows), 0);
    let mut write = |bytes: Vec<u8>| -> Result<(), Fill> {
        out.write_all(&bytes)?;
        n_written += 1;
        report(bytes.len() as u64, n_written == n_chunks)
    };
    std::thread::scope(|s| -> Result<(), Fill> {
        let mut in_flight = std::collections::VecDeque::new();
        for start in (0..n_rows).step_by(chunk_rows) {
            let rows = start..(start + chunk_rows).min(n_rows);
            let handle = match block_rows {
                None => {
                    let values = draw(spec.init, &mut rng, rows.len() * n_per_row);
                    s.spawn(move || encode_rows(&values))
                }
                Some(b) => s.spawn(move || encode_rows(&block_values(spec, seed, b, n_rows, rows))),
            };
            in_flight.push_back(handle);
            if in_flight.len() >= threads {
                let done = in_flight.pop_front().expect("not empty");
                write(done.join().map_err(|_| panicked())??)?;
            }
        }
        for done in in_flight {
            write(done.join().map_err(|_| panicked())??)?;
        }
        Ok(())
    })
}

/// A tensor's values before they are stored in its type, in ggml order (`dims[0]` fastest).
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    /// `tid2eid` rows of expert ids.
    Ids(Vec<i32>),
}

/// The values of one tensor, drawn from its own random stream (seed and name), or from per-block streams for a
/// tensor of at least 2^30 values.
pub fn tensor_values(spec: &TensorSpec, seed: u64) -> Values {
    tensor_values_with(spec, seed, &Streams::DEFAULT)
}

/// [`tensor_values`] with other [`Streams`].
fn tensor_values_with(spec: &TensorSpec, seed: u64, streams: &Streams) -> Values {
    let mut rng = Rng::for_tensor(seed, &spec.name);
    let n: u64 = spec.dims.iter().product();
    let n = n as usize;
    if let Init::ExpertIds { n_expert } = spec.init {
        let n_used = (spec.dims[0] as usize).max(1);
        let ids = (0..n / n_used)
            .flat_map(|_| rng.distinct(n_used, n_expert as usize))
            .map(|e| e as i32);
        return Values::Ids(ids.collect());
    }
    match streams.block_rows(spec) {
        None => Values::F32(draw(spec.init, &mut rng, n)),
        Some(b) => {
            let n_rows = n / (spec.dims[0].max(1) as usize);
            Values::F32(block_values(spec, seed, b, n_rows, 0..n_rows))
        }
    }
}

/// The next `n` values of `rng` for `init` (not ids).
fn draw(init: Init, rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match init {
            Init::Normal(std) => std * rng.normal(),
            Init::Norm => 1.0 + 0.1 * rng.normal(),
            Init::Uniform(lo, hi) => lo + (hi - lo) * rng.uniform() as f32,
            Init::ExpertIds { .. } => unreachable!("ids are drawn by tensor_values"),
        })
        .collect()
}

/// Values of `rows` (starting on a block boundary) of a block-stream tensor with `n_rows` rows in blocks of
/// `block_rows`: each block from its own stream ([`Rng::for_block`]).
fn block_values(
    spec: &TensorSpec,
    seed: u64,
    block_rows: usize,
    n_rows: usize,
    rows: std::ops::Range<usize>,
) -> Vec<f32> {
    debug_assert!(rows.start % block_rows == 0 && rows.end <= n_rows);
    let n_per_row = spec.dims[0].max(1) as usize;
    let mut values = Vec::with_capacity(rows.len() * n_per_row);
    for start in (rows.start..rows.end).step_by(block_rows) {
        let block = (start / block_rows) as u64;
        let mut rng = Rng::for_block(seed, &spec.name, block);
        let end = (start + block_rows).min(rows.end);
        values.extend(draw(spec.init, &mut rng, (end - start) * n_per_row));
    }
    values
}

/// A tensor's f32 values as the bytes of its type.
pub fn encode_values(spec: &TensorSpec, values: &[f32]) -> Result<Vec<u8>, TinyError> {
    encode(&spec.name, spec.ty, values, spec.dims[0] as usize)
}

/// Types a weight can be stored in: those ggml has a quantizer for (not the activation-only Q8_1 / Q8_K).
pub(super) fn is_weight_type(ty: GgmlType) -> bool {
    crate::ggml::can_quantize_to(ty)
}

/// f32 values -> the bytes of `ty`: F32/F16/BF16 directly, block types through ggml's own quantizer.
fn encode(
    name: &str,
    ty: GgmlType,
    values: &[f32],
    n_per_row: usize,
) -> Result<Vec<u8>, TinyError> {
    match ty {
        GgmlType::F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => Ok(values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect()),
        GgmlType::Bf16 => Ok(values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect()),
        _ => quantize_rows(ty, values, n_per_row).map_err(|detail| TinyError::Type {
            tensor: name.into(),
            ty,
            detail,
        }),
    }
}

/// Quantizes whole rows with ggml's own quantizer; types that need an importance matrix get a uniform one.
fn quantize_rows(ty: GgmlType, values: &[f32], n_per_row: usize) -> Result<Vec<u8>, String> {
    let uniform = vec![1.0f32; n_per_row];
    let imatrix = crate::ggml::requires_imatrix(ty).then_some(uniform.as_slice());
    crate::ggml::quantize_rows(ty, values, n_per_row, imatrix).map_err(|e| e.to_string())
}
