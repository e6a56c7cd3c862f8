//! The safetensors reader against the reference writer (the PyPI `safetensors` package, numpy API), against
//! handcrafted files for the types numpy lacks (F8_E4M3, F8_E8M0, BF16), against a table of corrupt files, and on
//! sharded checkpoints.

use std::path::{Path, PathBuf};
use std::process::Command;

use quantize::fp::{e4m3_to_f32, e8m0_to_f32};
use quantize::safetensors::{Checkpoint, Dtype, Error, SafeTensors};
use serde_json::{json, Value as Json};

mod support;

use support::python;

/// A fresh, empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    support::scratch("safetensors", name)
}

/// Writes tensors with `safetensors.numpy.save_file` into `path` and returns what Python saw:
/// `{name: {"dtype", "shape", "hex"}}` (hex of the C-order little-endian bytes).
const WRITER: &str = r#"
import json, sys
import numpy as np
from safetensors.numpy import save_file
path, seed = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(seed)
dtypes = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
    "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64, "U64": np.uint64, "F64": np.float64,
}
shapes = [[3, 5], [7], [2, 3, 4], [], [0, 4], [1, 1, 9]]
tensors = {}
for i, (name, dt) in enumerate(dtypes.items()):
    shape = shapes[i % len(shapes)]
    if dt == np.bool_:
        a = rng.integers(0, 2, size=shape).astype(dt)
    elif np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    else:
        a = rng.standard_normal(size=shape).astype(dt)
    tensors[f"s{seed}.t{i}.{name.lower()}"] = a
save_file(tensors, path, metadata={"format": "np", "seed": str(seed)})
out = {}
for name, a in tensors.items():
    dt = {v: k for k, v in dtypes.items()}[a.dtype.type]
    out[name] = {"dtype": dt, "shape": list(a.shape), "hex": np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes().hex()}
print(json.dumps(out))
"#;

fn py_write(path: &Path, seed: u32) -> Json {
    let out = Command::new(python())
        .arg("-c")
        .arg(WRITER)
        .arg(path)
        .arg(seed.to_string())
        .output()
        .expect("cannot run the reference Python");
    assert!(
        out.status.success(),
        "safetensors writer failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that every tensor Python described reads back with the same dtype, shape and bytes.
fn assert_same(expected: &Json, read: impl Fn(&str) -> (Dtype, Vec<u64>, Vec<u8>)) {
    for (name, want) in expected.as_object().unwrap() {
        let (dtype, shape, bytes) = read(name);
        assert_eq!(dtype.name(), want["dtype"], "{name}");
        let want_shape: Vec<u64> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(shape, want_shape, "{name}");
        assert_eq!(hex(&bytes), want["hex"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn reads_reference_files() {
    let dir = scratch("reference");
    let path = dir.join("ref.safetensors");
    let expected = py_write(&path, 7);
    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.len(), expected.as_object().unwrap().len());
    let mut names: Vec<&str> = expected
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort();
    assert_eq!(st.names().collect::<Vec<_>>(), names);
    assert_same(&expected, |name| {
        let t = st.tensor(name).unwrap();
        (t.dtype, t.shape.to_vec(), t.bytes.to_vec())
    });
    assert_eq!(st.metadata()["format"], "np");
    assert_eq!(st.metadata()["seed"], "7");
    // Zero copy: the bytes point into the file's map, so two lookups give the same address.
    let a = st.tensor(names[0]).unwrap().bytes.as_ptr();
    assert_eq!(a, st.tensor(names[0]).unwrap().bytes.as_ptr());
    assert!(matches!(
        st.tensor("absent"),
        Err(Error::NoSuchTensor { .. })
    ));
}

/// A safetensors file from a header value and the data bytes (header padded with spaces to 8 bytes, as the
/// reference writer does).
fn craft(header: &Json, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    craft_raw(h.len() as u64, &h, data)
}

fn craft_raw(header_len: u64, header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = header_len.to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

#[test]
fn reads_handcrafted_checkpoint_dtypes() {
    // The checkpoint's own types (DSV4.md 2.6): F8_E4M3 weight with an F8_E8M0 block scale, FP4 experts as I8 with
    // E8M0 scales, BF16, F32, I64 tid2eid.
    let w: Vec<u8> = vec![0x38, 0xb8, 0x40, 0x00, 0x7e, 0x01]; // 1, -1, 2, 0, 448, 2^-9
    let ws = vec![128u8]; // 2^1
    let experts: Vec<u8> = vec![0x21, 0xf7];
    let es = vec![127u8, 126];
    let bf16: Vec<u8> = [1.0f32, -2.5]
        .iter()
        .map(|x| (x.to_bits() >> 16) as u16)
        .flat_map(u16::to_le_bytes)
        .collect();
    let f32s: Vec<u8> = [0.25f32, 3.0, -1.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let tid: Vec<u8> = [5i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let parts: [(&str, &str, Vec<u64>, &[u8]); 7] = [
        ("layers.0.attn.wq_a.weight", "F8_E4M3", vec![2, 3], &w),
        ("layers.0.attn.wq_a.scale", "F8_E8M0", vec![1, 1], &ws),
        (
            "layers.3.ffn.experts.0.w1.weight",
            "I8",
            vec![1, 2],
            &experts,
        ),
        (
            "layers.3.ffn.experts.0.w1.scale",
            "F8_E8M0",
            vec![1, 2],
            &es,
        ),
        ("embed.weight", "BF16", vec![2], &bf16),
        ("layers.0.hc_attn_base", "F32", vec![3], &f32s),
        ("layers.0.ffn.gate.tid2eid", "I64", vec![2, 1], &tid),
    ];
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in &parts {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let dir = scratch("handcrafted");
    std::fs::write(
        dir.join("model.safetensors"),
        craft(&Json::Object(header), &data),
    )
    .unwrap();

    let ck = Checkpoint::open(&dir).unwrap();
    let mut names: Vec<&str> = parts.iter().map(|p| p.0).collect();
    names.sort();
    assert_eq!(ck.names().collect::<Vec<_>>(), names);
    for (name, dtype, shape, bytes) in &parts {
        let t = ck.tensor(name).unwrap();
        assert_eq!(t.dtype.name(), *dtype);
        assert_eq!(t.shape, &shape[..]);
        assert_eq!(t.bytes, *bytes);
    }
    let t = ck.tensor("layers.0.attn.wq_a.weight").unwrap();
    assert_eq!(t.dtype, Dtype::F8E4M3);
    let values: Vec<f32> = t.bytes.iter().map(|&b| e4m3_to_f32(b)).collect();
    assert_eq!(values, [1.0, -1.0, 2.0, 0.0, 448.0, 2f32.powi(-9)]);
    let s = ck.tensor("layers.0.attn.wq_a.scale").unwrap();
    assert_eq!(e8m0_to_f32(s.bytes[0]), 2.0);
    assert_eq!(ck.shards()[0].metadata()["format"], "pt");
}

/// Builds the corrupt file, opens it, and returns the error.
fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> Error {
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(&path, bytes).unwrap();
    let err = SafeTensors::open(&path).expect_err(name);
    let msg = err.to_string();
    assert!(
        msg.contains(path.to_str().unwrap()),
        "{name}: message lacks the file: {msg}"
    );
    err
}

#[test]
fn rejects_corrupt_files() {
    let dir = scratch("corrupt");
    let t = |dtype: &str, shape: Json, begin: u64, end: u64| json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]});
    let good = craft(
        &json!({"a": t("F32", json!([2]), 0, 8), "b": t("U8", json!([4]), 8, 12)}),
        &[0; 12],
    );
    assert!(SafeTensors::open({
        let p = dir.join("good.safetensors");
        std::fs::write(&p, &good).unwrap();
        p
    })
    .is_ok());

    let e = open_err(&dir, "truncated_prefix", &good[..5]);
    assert!(matches!(e, Error::Truncated { len: 5, .. }), "{e}");

    let e = open_err(&dir, "header_past_end", &craft_raw(1000, b"{}", &[]));
    assert!(
        matches!(
            e,
            Error::HeaderPastEnd {
                header_len: 1000,
                available: 2,
                ..
            }
        ),
        "{e}"
    );

    let e = open_err(&dir, "header_too_large", &craft_raw(u64::MAX, b"{}", &[]));
    assert!(
        matches!(
            e,
            Error::HeaderTooLarge {
                header_len: u64::MAX,
                ..
            }
        ),
        "{e}"
    );

    let e = open_err(&dir, "bad_json", &craft_raw(9, b"{\"a\": [1,", &[]));
    assert!(matches!(e, Error::Json { .. }), "{e}");

    let e = open_err(&dir, "not_utf8", &craft_raw(4, b"{\"\xff\"", &[]));
    assert!(matches!(e, Error::Json { .. }), "{e}");

    let e = open_err(
        &dir,
        "wrong_field_type",
        &craft(
            &json!({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}),
            &[0; 8],
        ),
    );
    assert!(matches!(e, Error::Json { .. }), "{e}");

    let e = open_err(
        &dir,
        "unknown_field",
        &craft(
            &json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}),
            &[0; 8],
        ),
    );
    assert!(matches!(e, Error::Json { .. }), "{e}");

    let e = open_err(
        &dir,
        "negative_offset",
        &craft(
            &json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}),
            &[0; 8],
        ),
    );
    assert!(matches!(e, Error::Json { .. }), "{e}");

    let e = open_err(
        &dir,
        "offsets_past_end",
        &craft(&json!({"a": t("F32", json!([4]), 0, 16)}), &[0; 8]),
    );
    assert!(
        matches!(&e, Error::DataPastEnd { tensor, end: 16, data_len: 8, .. } if tensor == "a"),
        "{e}"
    );

    let e = open_err(&dir, "truncated_data", &good[..good.len() - 1]);
    assert!(
        matches!(&e, Error::DataPastEnd { tensor, end: 12, data_len: 11, .. } if tensor == "b"),
        "{e}"
    );

    let e = open_err(
        &dir,
        "reversed_offsets",
        &craft(&json!({"a": t("U8", json!([0]), 8, 4)}), &[0; 8]),
    );
    assert!(
        matches!(
            e,
            Error::OffsetsReversed {
                begin: 8,
                end: 4,
                ..
            }
        ),
        "{e}"
    );

    let e = open_err(
        &dir,
        "overlap",
        &craft(
            &json!({"a": t("F32", json!([2]), 0, 8), "b": t("F32", json!([2]), 4, 12)}),
            &[0; 12],
        ),
    );
    assert!(
        matches!(&e, Error::Overlap { tensor, other, begin: 4, other_end: 8, .. } if tensor == "b" && other == "a"),
        "{e}"
    );

    let e = open_err(
        &dir,
        "same_range",
        &craft(
            &json!({"a": t("F32", json!([2]), 0, 8), "b": t("I32", json!([2]), 0, 8)}),
            &[0; 8],
        ),
    );
    assert!(matches!(e, Error::Overlap { .. }), "{e}");

    let e = open_err(
        &dir,
        "size_mismatch",
        &craft(&json!({"w": t("BF16", json!([3, 2]), 0, 8)}), &[0; 8]),
    );
    assert!(
        matches!(&e, Error::SizeMismatch { tensor, expected: 12, found: 8, dtype: Dtype::BF16, .. } if tensor == "w"),
        "{e}"
    );
    assert!(e.to_string().contains("\"w\""), "{e}");

    let e = open_err(
        &dir,
        "shape_overflow",
        &craft(&json!({"w": t("F64", json!([u64::MAX, 2]), 0, 8)}), &[0; 8]),
    );
    assert!(matches!(e, Error::ShapeOverflow { .. }), "{e}");

    let e = open_err(
        &dir,
        "unknown_dtype",
        &craft(&json!({"w": t("F4", json!([2]), 0, 1)}), &[0; 8]),
    );
    assert!(
        matches!(&e, Error::UnknownDtype { tensor, dtype, .. } if tensor == "w" && dtype == "F4"),
        "{e}"
    );
    assert!(e.to_string().contains("\"F4\""), "{e}");

    let dup = br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    let e = open_err(
        &dir,
        "duplicate",
        &craft_raw(dup.len() as u64, dup, &[0; 2]),
    );
    assert!(
        matches!(&e, Error::DuplicateTensor { tensor, .. } if tensor == "a"),
        "{e}"
    );

    let e = open_err(&dir, "not_object", &craft_raw(2, b"[]", &[]));
    assert!(matches!(e, Error::Json { .. }), "{e}");
}

#[test]
fn sharded_checkpoint() {
    let dir = scratch("sharded");
    let a = py_write(&dir.join("model-00001-of-00002.safetensors"), 1);
    let b = py_write(&dir.join("model-00002-of-00002.safetensors"), 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, tensors) in [
        ("model-00001-of-00002.safetensors", &a),
        ("model-00002-of-00002.safetensors", &b),
    ] {
        for name in tensors.as_object().unwrap().keys() {
            weight_map.insert(name.clone(), json!(shard));
        }
    }
    let index = |map: &serde_json::Map<String, Json>| {
        json!({"metadata": {"total_size": 123}, "weight_map": map}).to_string()
    };
    std::fs::write(dir.join("model.safetensors.index.json"), index(&weight_map)).unwrap();

    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.shards().len(), 2);
    let mut names: Vec<&str> = weight_map.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(ck.names().collect::<Vec<_>>(), names);
    for expected in [&a, &b] {
        assert_same(expected, |name| {
            let t = ck.tensor(name).unwrap();
            (t.dtype, t.shape.to_vec(), t.bytes.to_vec())
        });
    }
    let e = ck.tensor("nope").unwrap_err();
    assert!(
        matches!(&e, Error::NoSuchTensor { tensor, .. } if tensor == "nope"),
        "{e}"
    );

    // A tensor the index lists in a shard that lacks it.
    let mut ghost = weight_map.clone();
    ghost.insert("ghost".into(), json!("model-00002-of-00002.safetensors"));
    std::fs::write(dir.join("model.safetensors.index.json"), index(&ghost)).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err();
    assert!(
        matches!(&e, Error::NotInShard { tensor, path } if tensor == "ghost" && path.ends_with("model-00002-of-00002.safetensors")),
        "{e}"
    );

    // A shard file that is not there.
    let mut missing = weight_map.clone();
    missing.insert("ghost".into(), json!("model-00003-of-00002.safetensors"));
    std::fs::write(dir.join("model.safetensors.index.json"), index(&missing)).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err();
    assert!(
        matches!(&e, Error::MissingShard { shard, tensor, .. } if shard == "model-00003-of-00002.safetensors" && tensor == "ghost"),
        "{e}"
    );

    // A shard name that leaves the folder.
    let mut escape = weight_map.clone();
    escape.insert("ghost".into(), json!("../x.safetensors"));
    std::fs::write(dir.join("model.safetensors.index.json"), index(&escape)).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err();
    assert!(matches!(e, Error::BadShardName { .. }), "{e}");

    // A truncated shard.
    std::fs::write(dir.join("model.safetensors.index.json"), index(&weight_map)).unwrap();
    let second = dir.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&second).unwrap();
    std::fs::write(&second, &bytes[..bytes.len() - 3]).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err();
    assert!(
        matches!(&e, Error::DataPastEnd { path, .. } if *path == second),
        "{e}"
    );

    // A bad index.
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        b"{\"weight_map\": 3}",
    )
    .unwrap();
    assert!(matches!(Checkpoint::open(&dir), Err(Error::Json { .. })));

    // No checkpoint at all.
    let empty = scratch("empty");
    assert!(matches!(
        Checkpoint::open(&empty),
        Err(Error::NoCheckpoint { .. })
    ));
}

#[test]
fn single_file_checkpoint() {
    let dir = scratch("single");
    let expected = py_write(&dir.join("model.safetensors"), 3);
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.shards().len(), 1);
    assert_eq!(ck.len(), expected.as_object().unwrap().len());
    assert_same(&expected, |name| {
        let t = ck.tensor(name).unwrap();
        (t.dtype, t.shape.to_vec(), t.bytes.to_vec())
    });
}
