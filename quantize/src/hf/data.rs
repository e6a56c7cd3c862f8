//! The checkpoint data behind each GGUF tensor, looked up and checked for presence, dtype and shape.

use std::collections::BTreeSet;
use std::path::Path;

use crate::safetensors::{Checkpoint, Dtype, TensorView};

use super::{HfConfig, HfError, HfTensor, Source};

/// How one checkpoint matrix is encoded.
#[derive(Clone, Copy, Debug)]
pub enum Encoded<'a> {
    F32(&'a [u8]),
    F16(&'a [u8]),
    Bf16(&'a [u8]),
    /// FP8 E4M3 with one E8M0 scale per `block` tile (`scale` is [ceil(rows/b0), ceil(cols/b1)]).
    Fp8 {
        weight: &'a [u8],
        scale: &'a [u8],
        block: [usize; 2],
    },
    /// FP4 E2M1, two per byte, with one E8M0 scale per 32 inputs.
    Fp4 {
        weight: &'a [u8],
        scale: &'a [u8],
    },
}

impl Encoded<'_> {
    /// The checkpoint's name of this encoding.
    pub fn name(&self) -> &'static str {
        match self {
            Encoded::F32(_) => "F32",
            Encoded::F16(_) => "F16",
            Encoded::Bf16(_) => "BF16",
            Encoded::Fp8 { .. } => "FP8",
            Encoded::Fp4 { .. } => "FP4",
        }
    }

    /// Bytes read from the checkpoint, scales included.
    pub fn n_bytes(&self) -> u64 {
        (match self {
            Encoded::F32(b) | Encoded::F16(b) | Encoded::Bf16(b) => b.len(),
            Encoded::Fp8 { weight, scale, .. } | Encoded::Fp4 { weight, scale } => {
                weight.len() + scale.len()
            }
        }) as u64
    }
}

/// A `[rows, cols]` row-major matrix of the checkpoint (the GGUF's `{cols, rows}`), possibly made of several
/// matrices side by side along the columns.
#[derive(Clone, Debug)]
pub struct HfMatrix<'a> {
    pub rows: usize,
    pub cols: usize,
    /// Parts in column order: (columns, encoding).
    pub parts: Vec<(usize, Encoded<'a>)>,
}

/// A GGUF tensor's data in the checkpoint, checked.
#[derive(Clone, Debug)]
pub enum HfData<'a> {
    /// One matrix per expert (one for other tensors); 1-D tensors are a single row.
    Matrices(Vec<HfMatrix<'a>>),
    /// `tid2eid`: little-endian I64 or I32 ids.
    TokenIds { bytes: &'a [u8], wide: bool },
}

/// Looks every tensor of `tensors` up in the checkpoint and checks dtype and shape; also refuses checkpoint tensors
/// that none of them uses (other than the MTP block's when it is not exported).
pub fn resolve<'a>(
    ckpt: &'a Checkpoint,
    cfg: &HfConfig,
    tensors: &[HfTensor],
    with_mtp: bool,
) -> Result<Vec<HfData<'a>>, HfError> {
    let dir = ckpt.dir().to_path_buf();
    let mut used = BTreeSet::new();
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        let get = |name: &str, used: &mut BTreeSet<String>| -> Result<TensorView<'a>, HfError> {
            used.insert(name.to_string());
            ckpt.tensor(name).map_err(|e| match e {
                crate::safetensors::Error::NoSuchTensor { .. } => HfError::Missing {
                    dir: dir.clone(),
                    name: name.into(),
                    gguf: t.gguf.clone(),
                },
                other => other.into(),
            })
        };
        let rows_cols = |dims: &[u64]| -> (u64, u64) {
            match dims.len() {
                1 => (1, dims[0]),
                _ => (dims[1], dims[0]),
            }
        };
        let data = match &t.source {
            Source::Dense(name) | Source::Float32(name) => {
                let (rows, cols) = rows_cols(&t.dims);
                let shape = if t.dims.len() == 1 {
                    vec![cols]
                } else {
                    vec![rows, cols]
                };
                let m = matrix(&dir, cfg, name, &shape, false, &mut used, &get)?;
                HfData::Matrices(vec![m])
            }
            Source::Experts(names) => {
                let (rows, cols) = (t.dims[1], t.dims[0]);
                let ms = names
                    .iter()
                    .map(|name| matrix(&dir, cfg, name, &[rows, cols], true, &mut used, &get))
                    .collect::<Result<Vec<_>, _>>()?;
                HfData::Matrices(ms)
            }
            Source::ConcatInputs(names) => {
                let rows = t.dims[1];
                let cols = t.dims[0] / names.len() as u64;
                let mut parts = Vec::new();
                for name in names {
                    let m = matrix(&dir, cfg, name, &[rows, cols], false, &mut used, &get)?;
                    parts.extend(m.parts);
                }
                HfData::Matrices(vec![HfMatrix {
                    rows: rows as usize,
                    cols: t.dims[0] as usize,
                    parts,
                }])
            }
            Source::TokenIds(name) => {
                let view = get(name, &mut used)?;
                let wide = match view.dtype {
                    Dtype::I64 => true,
                    Dtype::I32 => false,
                    other => return Err(dtype_err(&dir, name, "I64 (or I32)", other)),
                };
                let expected = vec![t.dims[1], t.dims[0]];
                if view.shape != expected.as_slice() {
                    return Err(shape_err(&dir, name, expected, view.shape));
                }
                HfData::TokenIds {
                    bytes: view.bytes,
                    wide,
                }
            }
        };
        out.push(data);
    }
    let unknown: Vec<&str> = ckpt
        .names()
        .filter(|n| !used.contains(*n))
        .filter(|n| {
            !(n.ends_with(".scale")
                && used.contains(&format!("{}.weight", n.trim_end_matches(".scale"))))
        })
        .filter(|n| with_mtp || !n.starts_with("mtp."))
        // The MTP block's own output mixer has no slot in llama.cpp's layout (it uses output_hc_*; DSV4.md 2.5).
        .filter(|n| !(n.starts_with("mtp.") && n.contains(".hc_head_")))
        .collect();
    if !unknown.is_empty() {
        return Err(HfError::Unknown {
            dir,
            n: unknown.len(),
            examples: unknown
                .iter()
                .take(5)
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(out)
}

fn dtype_err(dir: &Path, name: &str, expected: &str, got: Dtype) -> HfError {
    HfError::Dtype {
        dir: dir.to_path_buf(),
        name: name.into(),
        expected: expected.into(),
        got: got.name().into(),
    }
}

fn shape_err(dir: &Path, name: &str, expected: Vec<u64>, got: &[u64]) -> HfError {
    HfError::Shape {
        dir: dir.to_path_buf(),
        name: name.into(),
        expected,
        got: got.to_vec(),
    }
}

/// Looks a checkpoint tensor up and records it as used.
type Lookup<'a, 'f> = dyn Fn(&str, &mut BTreeSet<String>) -> Result<TensorView<'a>, HfError> + 'f;

/// One checkpoint matrix of shape `shape` ([rows, cols], or [cols] for 1-D) in any encoding the checkpoint uses.
fn matrix<'a>(
    dir: &Path,
    cfg: &HfConfig,
    name: &str,
    shape: &[u64],
    fp4_allowed: bool,
    used: &mut BTreeSet<String>,
    get: &Lookup<'a, '_>,
) -> Result<HfMatrix<'a>, HfError> {
    let view = get(name, used)?;
    let (rows, cols) = match shape {
        [c] => (1u64, *c),
        [r, c] => (*r, *c),
        _ => unreachable!("matrices are 1-D or 2-D"),
    };
    let scale_name = format!("{}.scale", name.trim_end_matches(".weight"));
    let enc = match view.dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
            if view.shape != shape {
                return Err(shape_err(dir, name, shape.to_vec(), view.shape));
            }
            match view.dtype {
                Dtype::F32 => Encoded::F32(view.bytes),
                Dtype::F16 => Encoded::F16(view.bytes),
                _ => Encoded::Bf16(view.bytes),
            }
        }
        Dtype::F8E4M3 if shape.len() == 2 => {
            if view.shape != shape {
                return Err(shape_err(dir, name, shape.to_vec(), view.shape));
            }
            let [b0, b1] = cfg.fp8_block;
            let scale = get(&scale_name, used)?;
            let expected = vec![rows.div_ceil(b0), cols.div_ceil(b1)];
            check_scale(dir, &scale_name, &scale, expected)?;
            Encoded::Fp8 {
                weight: view.bytes,
                scale: scale.bytes,
                block: [b0 as usize, b1 as usize],
            }
        }
        Dtype::I8 | Dtype::U8 if fp4_allowed => {
            let expected = vec![rows, cols / 2];
            if cols % 32 != 0 || view.shape != expected.as_slice() {
                return Err(shape_err(dir, name, expected, view.shape));
            }
            let scale = get(&scale_name, used)?;
            check_scale(dir, &scale_name, &scale, vec![rows, cols / 32])?;
            Encoded::Fp4 {
                weight: view.bytes,
                scale: scale.bytes,
            }
        }
        other => {
            let expected = match (shape.len(), fp4_allowed) {
                (1, _) => "BF16, F16 or F32",
                (_, false) => "F8_E4M3 (with a .scale), BF16, F16 or F32",
                (_, true) => "I8 FP4 (with a .scale), F8_E4M3, BF16, F16 or F32",
            };
            return Err(dtype_err(dir, name, expected, other));
        }
    };
    Ok(HfMatrix {
        rows: rows as usize,
        cols: cols as usize,
        parts: vec![(cols as usize, enc)],
    })
}

fn check_scale(
    dir: &Path,
    name: &str,
    scale: &TensorView,
    expected: Vec<u64>,
) -> Result<(), HfError> {
    if scale.dtype != Dtype::F8E8M0 {
        return Err(dtype_err(dir, name, "F8_E8M0", scale.dtype));
    }
    if scale.shape != expected.as_slice() {
        return Err(shape_err(dir, name, expected, scale.shape));
    }
    Ok(())
}

/// True when the checkpoint has an MTP block (`mtp.0.*`).
pub fn has_mtp(ckpt: &Checkpoint) -> bool {
    ckpt.names().any(|n| n.starts_with("mtp.0."))
}
