//! [`plan`]: every output tensor's type and method, decided from headers (and the small expert-id tables, which are
//! range-checked here).

use gguf::deepseek4::key;
use gguf::{GgmlType, Value};

use crate::hf::{self, Encoded, HfData, HfTensor};
use crate::recipe::{block_fallback, Family};

use super::{Codec, ConvertError, Data, Input, Item, Method, Options, Plan};

/// An output tensor before planning: name, GGUF shape, data.
type Source<'a> = (String, Vec<u64>, Data<'a>);

/// GGUF key of the quantization format version (llama.cpp writes 2).
const QUANTIZATION_VERSION: &str = "general.quantization_version";
const FILE_TYPE: &str = "general.file_type";

/// Decides every output tensor: type (recipe, overrides, llama.cpp's block fallbacks, the importance matrix), method,
/// sizes. Reads headers, and the expert-id tables to check their ids; refuses empty or overflowing shapes.
pub fn plan<'a>(
    input: &'a Input,
    opts: &Options<'a>,
    codec: &dyn Codec,
) -> Result<Plan<'a>, ConvertError> {
    let mut notes = Vec::new();
    let (mut metadata, sources): (Vec<(String, Value)>, Vec<Source<'a>>) = match input {
        Input::Hf {
            dir,
            config,
            ckpt,
            vocab,
            has_mtp,
        } => {
            let with_mtp = *has_mtp && opts.keep_mtp;
            // The names are built from the config's counts: first check the checkpoint can hold them.
            let needed = config.expert_tensors(with_mtp);
            if needed > ckpt.len() as u64 {
                return Err(ConvertError::Input {
                    path: dir.clone(),
                    problem: format!(
                        "config.json asks for {} layers x {} routed experts, {needed} expert tensors, and the \
                         checkpoint holds {} tensors in all; config.json does not belong to these safetensors \
                         (hint: check num_hidden_layers and n_routed_experts)",
                        config.n_layer,
                        config.n_expert,
                        ckpt.len()
                    ),
                });
            }
            let tensors: Vec<HfTensor> = config.tensors(with_mtp);
            let data = hf::resolve(ckpt, config, &tensors, with_mtp)?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "DeepSeek V4".into());
            let mut md: Vec<(String, Value)> = config.metadata(with_mtp);
            md.insert(1, ("general.name".into(), Value::String(name)));
            match vocab {
                Some(v) => md.extend(v.metadata()),
                None => {
                    notes.push(format!(
                        "{} has no tokenizer.json: the GGUF gets no vocabulary (tokenizer.ggml.model = \"none\"); \
                         only token-id commands (ferrite logits) can use it",
                        dir.display()
                    ));
                    md.push((key::TOKENIZER_MODEL.into(), Value::String("none".into())));
                }
            }
            if with_mtp
                && ckpt
                    .names()
                    .any(|n| n.starts_with("mtp.") && n.contains(".hc_head_"))
            {
                notes.push(
                    "the MTP block's own hc_head_fn/base/scale have no slot in llama.cpp's deepseek4 layout (its MTP \
                     uses the main output_hc_*): left out"
                        .into(),
                );
            }
            if *has_mtp && !opts.keep_mtp {
                notes.push("the checkpoint's MTP block is left out (--no-mtp)".into());
            }
            let sources = tensors
                .into_iter()
                .zip(data)
                .map(|(t, d)| (t.gguf, t.dims, Data::Hf(d)))
                .collect();
            (md, sources)
        }
        Input::Gguf { model, .. } => {
            let md = model
                .metadata()
                .iter()
                .filter(|(k, _)| !k.starts_with("split."))
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            let sources = model
                .tensors()
                .iter()
                .map(|t| {
                    let data = Data::Ggml {
                        ty: t.info.ty,
                        bytes: model.tensor_data(t),
                    };
                    (t.info.name.clone(), t.info.dims.clone(), data)
                })
                .collect();
            (md, sources)
        }
    };
    set_meta(&mut metadata, FILE_TYPE, Value::U32(opts.recipe.file_type));
    set_meta(&mut metadata, QUANTIZATION_VERSION, Value::U32(2));
    if let Some(name) = &opts.name {
        set_meta(&mut metadata, "general.name", Value::String(name.clone()));
    }

    let n_expert = metadata
        .iter()
        .find(|(k, _)| k == key::EXPERT_COUNT)
        .and_then(|(_, v)| v.as_i128())
        .and_then(|n| u64::try_from(n).ok());
    let mut items = Vec::with_capacity(sources.len());
    let mut imatrix_missing = Vec::new();
    for (name, dims, data) in sources {
        check_dims(&name, &dims)?;
        let item = plan_item(name, dims, data, opts, codec, &mut imatrix_missing)?;
        check_expert_ids(&item, n_expert)?;
        items.push(item);
    }
    if !imatrix_missing.is_empty() {
        notes.push(format!(
            "{} tensor(s) wanted an importance matrix for their type and had none (no --imatrix, or no entry in it): \
             they use Q2_K instead ({}{}); pass --imatrix FILE (llama.cpp's llama-imatrix makes one) for the \
             recipe's type",
            imatrix_missing.len(),
            imatrix_missing.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            if imatrix_missing.len() > 3 { ", ..." } else { "" }
        ));
    }
    Ok(Plan {
        metadata,
        items,
        notes,
    })
}

fn set_meta(md: &mut Vec<(String, Value)>, key: &str, value: Value) {
    match md.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => {
            // After general.architecture / general.name, like llama.cpp's writers.
            let at = md
                .iter()
                .position(|(k, _)| !k.starts_with("general."))
                .unwrap_or(md.len());
            md.insert(at, (key.to_string(), value));
        }
    }
}

fn plan_item<'a>(
    name: String,
    dims: Vec<u64>,
    data: Data<'a>,
    opts: &Options<'a>,
    codec: &dyn Codec,
    imatrix_missing: &mut Vec<String>,
) -> Result<Item<'a>, ConvertError> {
    let family = Family::of(&name, dims.len());
    let o = &opts.overrides;
    let wanted = match family {
        Family::ExpertsGateUp | Family::ExpertsDown => o.experts,
        Family::Shared => o.shared,
        Family::Attention => o.attention,
        Family::Output => o.output,
        Family::Embeddings => o.embeddings,
        Family::KeepF32 | Family::TokenIds => None,
    }
    .unwrap_or_else(|| opts.recipe.target(family));
    let err = |detail: String| ConvertError::Tensor {
        tensor: name.clone(),
        detail,
    };
    let (source_type, source_bytes) = match &data {
        Data::Hf(HfData::Matrices(ms)) => {
            let enc = ms[0].parts[0].1;
            (
                enc.name().to_string(),
                ms.iter()
                    .flat_map(|m| m.parts.iter().map(|p| p.1.n_bytes()))
                    .sum(),
            )
        }
        Data::Hf(HfData::TokenIds { bytes, wide }) => (
            (if *wide { "I64" } else { "I32" }).to_string(),
            bytes.len() as u64,
        ),
        Data::Ggml { ty, bytes } => (ty.name().to_string(), bytes.len() as u64),
    };

    if family == Family::TokenIds {
        return match &data {
            Data::Ggml { ty, .. } if *ty != GgmlType::I32 => {
                Err(err(format!("expert ids are {ty}, expected I32")))
            }
            _ => Ok(Item {
                name,
                dims,
                source_type,
                source_bytes,
                ty: GgmlType::I32,
                method: if matches!(data, Data::Ggml { .. }) {
                    Method::Copy
                } else {
                    Method::Ids
                },
                note: None,
                data,
                imatrix: None,
            }),
        };
    }

    let n_per_row = dims[0];
    let mut ty = wanted;
    let mut note = None;
    if !codec.can_quantize(ty) {
        return Err(err(format!("ggml cannot make {ty} tensors")));
    }
    if let Some(fallback) = block_fallback(ty, n_per_row) {
        note = Some(format!(
            "rows of {n_per_row} are not whole {ty} blocks of {}: {fallback} (llama.cpp's fallback)",
            ty.block_size()
        ));
        ty = fallback;
    }
    let mut imatrix = None;
    if ty.is_quantized() {
        if let Some(im) = opts.imatrix {
            // llama.cpp's check: n_per_row x n_mat values (a legacy file's are split by the tensor's shape).
            let entry = im
                .weights_for(&name, &dims)
                .map_err(|e| err(e.to_string()))?;
            imatrix = entry.map(|e| e.values);
        }
        if imatrix.is_none() && codec.requires_imatrix(ty) {
            imatrix_missing.push(name.clone());
            let q2k = GgmlType::Q2K;
            ty = block_fallback(q2k, n_per_row).unwrap_or(q2k);
            note = Some(format!("{wanted} needs an importance matrix: {ty} instead"));
        }
    }

    let method = match &data {
        Data::Ggml { ty: src, .. } if *src == ty => Method::Copy,
        Data::Ggml { ty: src, .. } => {
            if dequantizable(*src) {
                Method::Quantize
            } else {
                return Err(err(format!(
                    "its type {src} cannot be converted (no ggml dequantizer)"
                )));
            }
        }
        Data::Hf(HfData::Matrices(ms)) => {
            let single = ms.iter().all(|m| m.parts.len() == 1);
            let enc = ms[0].parts[0].1;
            match (enc, ty) {
                (Encoded::Fp4 { .. }, GgmlType::Mxfp4) if single => Method::Repack,
                (Encoded::F32(_), GgmlType::F32)
                | (Encoded::F16(_), GgmlType::F16)
                | (Encoded::Bf16(_), GgmlType::Bf16)
                    if single =>
                {
                    Method::Copy
                }
                _ => Method::Quantize,
            }
        }
        Data::Hf(HfData::TokenIds { .. }) => {
            return Err(err("expert ids in a weight's place".into()))
        }
    };
    Ok(Item {
        name,
        dims,
        source_type,
        source_bytes,
        ty,
        method,
        note,
        data,
        imatrix,
    })
}

/// A tensor's shape must be 1 to 4 dimensions, none of them 0, with an element count that fits in 63 bits (ggml's
/// `int64_t` sizes): an empty or overflowing shape would reach row arithmetic as a division by 0 or a wrapped size.
fn check_dims(name: &str, dims: &[u64]) -> Result<(), ConvertError> {
    let err = |detail: String| ConvertError::Tensor {
        tensor: name.to_string(),
        detail,
    };
    if dims.is_empty() || dims.len() > 4 {
        return Err(err(format!("{} dimensions, expected 1 to 4", dims.len())));
    }
    if let Some(i) = dims.iter().position(|&d| d == 0) {
        return Err(err(format!(
            "dimension {i} of {dims:?} is 0: an empty tensor (expected every dimension >= 1)"
        )));
    }
    let count = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64);
    if count.is_none() {
        return Err(err(format!(
            "shape {dims:?} holds more than 2^63 values (a corrupt shape)"
        )));
    }
    Ok(())
}

/// An expert-id table (`ffn_gate_tid2eid`: the only I32 data a DeepSeek V4 file has, copied as it is) must name
/// experts that exist: every id in `0..n_expert`
/// (`deepseek4.expert_count`). An id beyond them would make an engine read or write past its expert tensors.
fn check_expert_ids(item: &Item, n_expert: Option<u64>) -> Result<(), ConvertError> {
    let (bytes, width) = match &item.data {
        Data::Ggml {
            ty: GgmlType::I32,
            bytes,
        } => (*bytes, 4),
        Data::Hf(HfData::TokenIds { bytes, wide }) => (*bytes, if *wide { 8 } else { 4 }),
        _ => return Ok(()),
    };
    let err = |detail: String| ConvertError::Tensor {
        tensor: item.name.clone(),
        detail,
    };
    let Some(n_expert) = n_expert else {
        return Err(err(format!(
            "expert ids, but the metadata has no {} to check them against",
            key::EXPERT_COUNT
        )));
    };
    for (i, id) in bytes.chunks_exact(width).enumerate() {
        let id = match width {
            4 => i32::from_le_bytes([id[0], id[1], id[2], id[3]]) as i64,
            _ => i64::from_le_bytes([id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7]]),
        };
        if id < 0 || id as u64 >= n_expert {
            return Err(err(format!(
                "expert id {id} at index {i}, expected 0 to {} ({} = {n_expert})",
                n_expert - 1,
                key::EXPERT_COUNT
            )));
        }
    }
    Ok(())
}

/// Types ggml can turn back into f32 (everything but the integer types).
fn dequantizable(ty: GgmlType) -> bool {
    !matches!(
        ty,
        GgmlType::I8 | GgmlType::I16 | GgmlType::I32 | GgmlType::I64 | GgmlType::F64
    )
}
