//! Expert I/O checks the tests use: the slabs of an expert as the map holds them, a loaded slot checked against
//! them, read jobs cut from slot tensors or a packed pool, one expert read on its own.

use ferrite::experts::io::PARTS;
use ferrite::experts::{
    ExpertIoError, ExpertKey, ExpertLayout, ExpertReader, Load, ReadJob, ReadReport, SlotBuffers,
};
use gguf::Model;

/// Reads one expert into `dest` (one job of [`ExpertReader::read`]).
pub fn read_one(
    reader: &ExpertReader,
    key: ExpertKey,
    dest: SlotBuffers<'_>,
) -> Result<ReadReport, ExpertIoError> {
    reader.read(vec![ReadJob { key, dest }])
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
