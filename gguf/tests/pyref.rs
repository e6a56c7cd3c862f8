//! Agreement with the reference implementation, the PyPI `gguf` package (tests/py/gguf_ref.py):
//! files it writes parse to the same metadata and tensor table, and files ferrite writes read back the same there.

#[path = "support/reference_python.rs"]
mod reference_python;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use gguf::{Array, GgmlType, GgufFile, Value, Writer};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use reference_python::{python, repo_root};

fn gguf_ref(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("tests/py/gguf_ref.py"))
        .args(args)
        .output()
        .expect("cannot run the reference Python");
    assert!(
        out.status.success(),
        "gguf_ref.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn dump(path: &Path) -> Json {
    serde_json::from_str(&gguf_ref(&["dump", path.to_str().unwrap()])).unwrap()
}

/// A metadata value in the dump's schema (floats as their bits in hex).
fn value_json(v: &Value) -> Json {
    match v {
        Value::F32(x) => json!(format!("0x{:08x}", x.to_bits())),
        Value::F64(x) => json!(format!("0x{:016x}", x.to_bits())),
        Value::Bool(b) => json!(b),
        Value::String(s) => json!(s),
        Value::Array(a) => array_json(a),
        other => {
            let i = other.as_i128().unwrap();
            match u64::try_from(i) {
                Ok(u) => json!(u),
                Err(_) => json!(i as i64),
            }
        }
    }
}

fn array_json(a: &Array) -> Json {
    let items: Vec<Json> = (0..a.len())
        .map(|i| value_json(&a.get(i).unwrap()))
        .collect();
    json!({"array": a.elem_type().name(), "items": items})
}

/// What ferrite's reader sees, in the dump's schema.
fn ferrite_view(path: &Path) -> Json {
    let f = GgufFile::open(path).unwrap();
    let h = f.header();
    let metadata: Vec<Json> = h
        .metadata
        .iter()
        .map(|(k, v)| json!([k, v.value_type().name(), value_json(v)]))
        .collect();
    let tensors: Vec<Json> = h
        .tensors
        .iter()
        .map(|t| {
            json!({
                "name": t.name, "type": t.ty.id(), "shape": t.dims, "offset": t.offset,
                "n_bytes": t.n_bytes, "sha256": hex(&Sha256::digest(f.tensor_data(t))),
            })
        })
        .collect();
    json!({
        "version": h.version, "tensor_count": h.tensors.len(), "kv_count": h.metadata.len(),
        "alignment": h.alignment, "data_offset": h.data_offset, "metadata": metadata, "tensors": tensors,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Drops the dump's `type_name` (gguf-py's spelling) so the tables compare on ids.
fn without_type_names(mut dump: Json) -> Json {
    for t in dump["tensors"].as_array_mut().unwrap() {
        t.as_object_mut().unwrap().remove("type_name");
    }
    dump
}

fn assert_same(ours: &Json, theirs: &Json) {
    for key in [
        "version",
        "tensor_count",
        "kv_count",
        "alignment",
        "data_offset",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let (m1, m2) = (
        ours["metadata"].as_array().unwrap(),
        theirs["metadata"].as_array().unwrap(),
    );
    assert_eq!(m1.len(), m2.len());
    for (a, b) in m1.iter().zip(m2) {
        assert_eq!(a, b);
    }
    let (t1, t2) = (
        ours["tensors"].as_array().unwrap(),
        theirs["tensors"].as_array().unwrap(),
    );
    assert_eq!(t1.len(), t2.len());
    for (a, b) in t1.iter().zip(t2) {
        assert_eq!(a, b);
    }
}

#[test]
fn reads_reference_files_identically() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[&[&str]] = &[
        &[],
        &["--alignment", "64"],
        &["--alignment", "256", "--version", "2"],
        &["--no-nested"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let path = dir.path().join(format!("ref{i}.gguf"));
        let mut args = vec!["write", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        gguf_ref(&args);
        let theirs = without_type_names(dump(&path));
        assert!(
            theirs["metadata"].as_array().unwrap().len() >= 30,
            "the reference file lost its metadata"
        );
        assert!(
            theirs["tensors"].as_array().unwrap().len() >= 20,
            "the reference file lost its tensors"
        );
        let ours = ferrite_view(&path);
        assert_same(&ours, &theirs);

        // Rewriting the reference file unchanged gives the same bytes.
        let f = GgufFile::open(&path).unwrap();
        let rewritten = dir.path().join(format!("rewrite{i}.gguf"));
        Writer::from_header(f.header())
            .unwrap()
            .write_file(&rewritten, false, |k, _, out| {
                out.write_all(f.tensor_data(&f.header().tensors[k]))
            })
            .unwrap();
        assert!(
            std::fs::read(&path).unwrap() == std::fs::read(&rewritten).unwrap(),
            "case {extra:?}: rewrite differs"
        );
    }
}

#[test]
fn reference_reads_ferrite_files_identically() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::new();
    w.set("general.architecture", Value::String("deepseek4".into()));
    w.set_alignment(128).unwrap();
    w.set("u8", Value::U8(255));
    w.set("i8", Value::I8(-128));
    w.set("u16", Value::U16(65535));
    w.set("i16", Value::I16(-32768));
    w.set("u32", Value::U32(u32::MAX));
    w.set("i32", Value::I32(i32::MIN));
    w.set("f32", Value::F32(f32::from_bits(0x7fc0_0001)));
    w.set("bool", Value::Bool(false));
    w.set("str", Value::String("<｜begin▁of▁sentence｜> 世界".into()));
    w.set("u64", Value::U64(u64::MAX));
    w.set("i64", Value::I64(i64::MIN));
    w.set("f64", Value::F64(-0.0));
    w.set("arr.u16", Value::Array(Array::U16(vec![1, 2, 3])));
    w.set("arr.f64", Value::Array(Array::F64(vec![1e300, -1e-300])));
    w.set("arr.str", Value::string_array(["", "a", "ü"]));
    w.set("arr.empty", Value::Array(Array::String(vec![])));
    w.set(
        "arr.nested",
        Value::Array(Array::Array(vec![
            Array::I32(vec![1, -1]),
            Array::Array(vec![Array::F32(vec![0.5])]),
        ])),
    );
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::Mxfp4,
        GgmlType::Iq4Xs,
        GgmlType::I32,
    ];
    for (i, ty) in types.iter().enumerate() {
        let dims: Vec<u64> = match i % 3 {
            0 => vec![256],
            1 => vec![256, 3],
            _ => vec![256, 2, 2],
        };
        w.add_tensor(&format!("t.{i}.{}", ty.name()), &dims, *ty)
            .unwrap();
    }
    let path = dir.path().join("ferrite.gguf");
    let fill = |i: usize, t: &gguf::PlannedTensor, out: &mut dyn Write| {
        // Finite f32/f16/bf16 bit patterns are not needed: the reference reads raw bytes.
        let bytes: Vec<u8> = (0..t.n_bytes)
            .map(|j| (j as usize * 13 + i) as u8)
            .collect();
        out.write_all(&bytes)
    };
    w.write_file(&path, false, fill).unwrap();
    let theirs = without_type_names(dump(&path));
    assert_same(&ferrite_view(&path), &theirs);
    // And the reference's view equals what we meant to write, not only what we read back.
    let meant: Vec<Json> = w
        .metadata()
        .iter()
        .map(|(k, v)| json!([k, v.value_type().name(), value_json(v)]))
        .collect();
    assert_eq!(theirs["metadata"], Json::Array(meant));
    assert_eq!(theirs["tensors"].as_array().unwrap().len(), types.len());
}
