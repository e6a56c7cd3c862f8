//! Values: the slice of a spec's values, encoded in the official formats and decoded back; the GGUF of the
//! dequantized checkpoint values, and the checkpoint tensors' bytes for [`Fill::Model`](super::Fill::Model).

use std::path::Path;

use quantize::dequant::{fp4_blocks, fp8_blocks};
use quantize::fp::{fp4_encode_rows, fp8_encode_blocks};

use super::layout::{
    matrix_of, official_of, official_specs, HfTensor, Official, Part, Plan, Slice,
};
use super::{CheckpointError, FP8_BLOCK};
use ferrite::model::names::blk;
use ferrite::model::tiny::{
    tensor_values, write_specs, TensorSpec, TinyConfig, TinyError, TinyModel, Values,
};

/// `[rows, cols]` of `values` (a spec's values in ggml order) for `slice`.
fn slice_values(values: &[f32], dims: &[u64], slice: Slice) -> Vec<f32> {
    let (rows, cols) = matrix_of(dims, slice);
    let (rows, cols) = (rows as usize, cols as usize);
    match slice {
        Slice::All => values.to_vec(),
        Slice::Expert(e) => {
            let n = rows * cols;
            values[e as usize * n..(e as usize + 1) * n].to_vec()
        }
        Slice::Cols(start, _) => {
            let width = dims[0] as usize;
            let start = start as usize;
            (0..rows)
                .flat_map(|r| {
                    values[r * width + start..r * width + start + cols]
                        .iter()
                        .copied()
                })
                .collect()
        }
    }
}

/// A matrix in an official block format.
struct Encoded {
    weight: Vec<u8>,
    scale: Vec<u8>,
}

fn encode_blocks(
    tensor: &str,
    values: &[f32],
    rows: usize,
    cols: usize,
    official: Official,
) -> Result<Encoded, String> {
    let (weight, scale) = match official {
        Official::Fp8 => fp8_encode_blocks(values, rows, cols, FP8_BLOCK),
        Official::Fp4 => fp4_encode_rows(values, rows, cols),
        _ => return Err(format!("{tensor} is not block-quantized")),
    }
    .map_err(|e| e.to_string())?;
    Ok(Encoded { weight, scale })
}

fn decode_blocks(
    enc: &Encoded,
    rows: usize,
    cols: usize,
    official: Official,
) -> Result<Vec<f32>, String> {
    match official {
        Official::Fp8 => fp8_blocks(&enc.weight, &enc.scale, rows, cols, FP8_BLOCK),
        _ => fp4_blocks(&enc.weight, &enc.scale, rows, cols),
    }
    .map_err(|e| e.to_string())
}

fn bf16_round(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// A GGUF tensor's values after a round trip through the official checkpoint dtypes: FP8/FP4 encoded and decoded
/// with `quantize`'s exact decoders (FP8 tiles and FP4 blocks per checkpoint tensor: per expert, per half of
/// `eh_proj`), BF16 rounded to nearest even, F32 and ids unchanged.
fn official_values(spec: &TensorSpec, n_layer: u32, seed: u64) -> Result<Values, TinyError> {
    let type_err = |detail: String| TinyError::Type {
        tensor: spec.name.clone(),
        ty: spec.ty,
        detail,
    };
    let official = official_of(&spec.name, n_layer)
        .ok_or_else(|| type_err("no official checkpoint dtype for this tensor".into()))?;
    let values = match tensor_values(spec, seed) {
        Values::Ids(ids) => return Ok(Values::Ids(ids)),
        Values::F32(values) => values,
    };
    Ok(Values::F32(match official {
        Official::F32 | Official::I64 => values,
        Official::Bf16 => values.into_iter().map(bf16_round).collect(),
        Official::Fp8 | Official::Fp4 => {
            let width = spec.dims[0] as usize;
            // Blocks never straddle the two halves of eh_proj: each half is its own checkpoint tensor.
            let parts: Vec<(usize, usize)> = if spec.name.ends_with(blk::NEXTN_EH_PROJ) {
                vec![(0, width / 2), (width / 2, width - width / 2)]
            } else {
                vec![(0, width)]
            };
            let rows = values.len() / width.max(1);
            let mut out = values.clone();
            for (start, len) in parts {
                let part: Vec<f32> = (0..rows)
                    .flat_map(|r| {
                        values[r * width + start..r * width + start + len]
                            .iter()
                            .copied()
                    })
                    .collect();
                // FP4 blocks run along rows, so the stacked experts can go as one matrix; FP8 tiles need 2-D.
                let enc =
                    encode_blocks(&spec.name, &part, rows, len, official).map_err(type_err)?;
                let dec = decode_blocks(&enc, rows, len, official).map_err(type_err)?;
                for r in 0..rows {
                    out[r * width + start..r * width + start + len]
                        .copy_from_slice(&dec[r * len..(r + 1) * len]);
                }
            }
            out
        }
    }))
}

/// Writes the GGUF a correct converter makes of [`write_tiny_checkpoint`]`(dir, cfg, seed, {mtp, Fill::Model})`: the
/// tensors of [`write_tiny_model`] (names, shapes, and types from `cfg.types`; per-expert tensors
/// stacked `{in, out, E}`) holding exactly the dequantized checkpoint values. With `cfg.types` all F32 (`tid2eid`
/// I32) that is the exact F32 GGUF of the checkpoint. With `mtp`, block `n_layer` (ratio 0) and its `nextn.eh_proj`
/// / `enorm` / `hnorm` / `shared_head_norm` are there too (block_count `n_layer + 1`), and `nextn_predict_layers`
/// is 1; without, it is 0 (whatever `cfg.nextn_predict_layers` says), as in the checkpoint's `config.json`.
/// FP8 tiles and FP4 blocks follow the checkpoint tensors: `n_embd` and `expert_ffn` must be multiples of 32.
///
/// [`write_tiny_checkpoint`]: super::write_tiny_checkpoint
/// [`write_tiny_model`]: ferrite::model::tiny::write_tiny_model
pub fn write_tiny_model_official(
    path: &Path,
    cfg: &TinyConfig,
    seed: u64,
    mtp: bool,
) -> Result<TinyModel, TinyError> {
    let (meta, specs, n_gguf) = official_specs(cfg, mtp)?;
    let specs = &specs[..n_gguf];
    write_specs(path, &meta, specs, |spec| {
        match official_values(spec, cfg.n_layer, seed)? {
            Values::Ids(ids) => Ok(ids.into_iter().flat_map(i32::to_le_bytes).collect()),
            Values::F32(values) => ferrite::model::tiny::encode_values(spec, &values),
        }
    })
}

/// [`Fill::Model`]: each checkpoint tensor's bytes from its spec's values. Keeps the values of the last few specs
/// (the experts of a layer come from three stacked tensors) and the last encoded block matrices (a weight and its
/// `.scale` are written one after the other).
///
/// [`Fill::Model`]: super::Fill::Model
pub(super) struct ModelFill<'p> {
    plan: &'p Plan,
    seed: u64,
    values: Vec<(usize, std::rc::Rc<Values>)>,
    encoded: Vec<((usize, Slice), std::rc::Rc<Encoded>)>,
}

const VALUE_CACHE: usize = 4;
const ENCODED_CACHE: usize = 2;

impl<'p> ModelFill<'p> {
    pub(super) fn new(plan: &'p Plan, seed: u64) -> ModelFill<'p> {
        ModelFill {
            plan,
            seed,
            values: Vec::new(),
            encoded: Vec::new(),
        }
    }

    fn values(&mut self, spec: usize) -> std::rc::Rc<Values> {
        if let Some((_, v)) = self.values.iter().find(|(s, _)| *s == spec) {
            return v.clone();
        }
        let v = std::rc::Rc::new(tensor_values(&self.plan.specs[spec], self.seed));
        if self.values.len() == VALUE_CACHE {
            self.values.remove(0);
        }
        self.values.push((spec, v.clone()));
        v
    }

    fn encoded(
        &mut self,
        t: &HfTensor,
        official: Official,
    ) -> Result<std::rc::Rc<Encoded>, CheckpointError> {
        let key = (t.spec, t.slice);
        if let Some((_, e)) = self.encoded.iter().find(|(k, _)| *k == key) {
            return Ok(e.clone());
        }
        let spec = &self.plan.specs[t.spec];
        let values = match &*self.values(t.spec) {
            Values::F32(v) => slice_values(v, &spec.dims, t.slice),
            Values::Ids(_) => return Err(self.encode_err(t, "expert ids are not a weight")),
        };
        let (rows, cols) = matrix_of(&spec.dims, t.slice);
        let enc = encode_blocks(
            &t.entry.name,
            &values,
            rows as usize,
            cols as usize,
            official,
        )
        .map_err(|d| self.encode_err(t, &d))?;
        let enc = std::rc::Rc::new(enc);
        if self.encoded.len() == ENCODED_CACHE {
            self.encoded.remove(0);
        }
        self.encoded.push((key, enc.clone()));
        Ok(enc)
    }

    fn encode_err(&self, t: &HfTensor, detail: &str) -> CheckpointError {
        CheckpointError::Encode {
            tensor: t.entry.name.clone(),
            detail: detail.to_string(),
        }
    }

    pub(super) fn bytes(&mut self, t: &HfTensor) -> Result<Vec<u8>, CheckpointError> {
        match t.part {
            Part::Fp8Weight => Ok(self.encoded(t, Official::Fp8)?.weight.clone()),
            Part::Fp8Scale => Ok(self.encoded(t, Official::Fp8)?.scale.clone()),
            Part::Fp4Weight => Ok(self.encoded(t, Official::Fp4)?.weight.clone()),
            Part::Fp4Scale => Ok(self.encoded(t, Official::Fp4)?.scale.clone()),
            Part::I64 => match &*self.values(t.spec) {
                Values::Ids(ids) => Ok(ids
                    .iter()
                    .flat_map(|&e| i64::from(e).to_le_bytes())
                    .collect()),
                Values::F32(_) => Err(self.encode_err(t, "not expert ids")),
            },
            Part::Bf16 | Part::F32 => {
                let spec = &self.plan.specs[t.spec];
                let values = match &*self.values(t.spec) {
                    Values::F32(v) => slice_values(v, &spec.dims, t.slice),
                    Values::Ids(_) => return Err(self.encode_err(t, "expert ids are not floats")),
                };
                Ok(match t.part {
                    Part::Bf16 => values
                        .iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                    _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                })
            }
        }
    }
}
