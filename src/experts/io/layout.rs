//! Where each (layer, expert)'s gate, up and down slabs lie in the model's file(s), and checks of loaded slots
//! against the memory map.

use std::collections::BTreeMap;
use std::path::PathBuf;

use gguf::{GgmlType, Model};

use super::ExpertIoError;
use crate::experts::policy::ExpertKey;
use crate::model::sizes::{expert_tensor_layer, EXPERT_TENSORS};

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
