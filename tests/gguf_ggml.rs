//! Files written by ferrite's GGUF writer are read identically by ggml's own reader (`gguf_init_from_file`), and
//! ferrite's reader agrees with ggml on files ggml accepts.

use gguf::{Array, GgmlType, GgufFile, Value, Writer};
use testkit::ggml_gguf::{read_gguf_with_ggml, GgufValue};

/// ferrite's value as ggml's reader reports it (ggml has no nested arrays).
fn as_ggml(v: &Value) -> GgufValue {
    match v {
        Value::U8(x) => GgufValue::U8(*x),
        Value::I8(x) => GgufValue::I8(*x),
        Value::U16(x) => GgufValue::U16(*x),
        Value::I16(x) => GgufValue::I16(*x),
        Value::U32(x) => GgufValue::U32(*x),
        Value::I32(x) => GgufValue::I32(*x),
        Value::F32(x) => GgufValue::F32(*x),
        Value::Bool(x) => GgufValue::Bool(*x),
        Value::String(x) => GgufValue::Str(x.clone()),
        Value::U64(x) => GgufValue::U64(*x),
        Value::I64(x) => GgufValue::I64(*x),
        Value::F64(x) => GgufValue::F64(*x),
        Value::Array(a) => GgufValue::Array {
            elem_type: a.elem_type() as u32,
            items: (0..a.len()).map(|i| as_ggml(&a.get(i).unwrap())).collect(),
        },
    }
}

fn sample(alignment: u32) -> Writer {
    let mut w = Writer::new();
    w.set("general.architecture", Value::String("deepseek4".into()));
    w.set_alignment(alignment).unwrap();
    w.set("u8", Value::U8(7));
    w.set("i8", Value::I8(-7));
    w.set("u16", Value::U16(700));
    w.set("i16", Value::I16(-700));
    w.set("u32", Value::U32(70000));
    w.set("i32", Value::I32(-70000));
    w.set("f32", Value::F32(1.5e-6));
    w.set("bool", Value::Bool(true));
    w.set("str", Value::String("<｜User｜> ü".into()));
    w.set("u64", Value::U64(1 << 40));
    w.set("i64", Value::I64(-(1 << 40)));
    w.set("f64", Value::F64(-2.25));
    w.set(
        "arr.i32",
        Value::Array(Array::I32(vec![0, 0, 4, 128, 4, 0])),
    );
    w.set("arr.f32", Value::Array(Array::F32(vec![10.0; 6])));
    w.set("arr.str", Value::string_array(["a", "", "b c"]));
    w.set("arr.empty", Value::Array(Array::U32(vec![])));
    for (i, ty) in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::Mxfp4,
        GgmlType::I32,
    ]
    .into_iter()
    .enumerate()
    {
        let dims: &[u64] = if i % 2 == 0 { &[256, 3] } else { &[256, 2, 2] };
        w.add_tensor(&format!("t{i}.{}", ty.name()), dims, ty)
            .unwrap();
    }
    w
}

#[test]
fn ggml_reads_ferrite_files_identically() {
    let dir = tempfile::tempdir().unwrap();
    for alignment in [32, 64, 256] {
        let w = sample(alignment);
        let path = dir.path().join(format!("a{alignment}.gguf"));
        w.write_file(&path, false, |i, t, out| {
            out.write_all(&vec![i as u8; t.n_bytes as usize])
        })
        .unwrap();
        let ggml = read_gguf_with_ggml(&path).unwrap();
        let ours = GgufFile::open(&path).unwrap();
        let h = ours.header();
        assert_eq!(ggml.version, h.version);
        assert_eq!(ggml.alignment as u64, h.alignment);
        assert_eq!(ggml.data_offset as u64, h.data_offset);
        let keys: Vec<(String, GgufValue)> = w
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_string(), as_ggml(v)))
            .collect();
        let theirs: Vec<(String, GgufValue)> = ggml
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        assert_eq!(theirs, keys);
        assert_eq!(ggml.tensors.len(), h.tensors.len());
        for (g, t) in ggml.tensors.iter().zip(&h.tensors) {
            let mut ne = [1i64; 4];
            for (d, &x) in ne.iter_mut().zip(&t.dims) {
                *d = x as i64;
            }
            assert_eq!(
                (
                    g.name.as_str(),
                    g.type_id,
                    g.ne,
                    g.offset as u64,
                    g.size as u64
                ),
                (t.name.as_str(), t.ty.id(), ne, t.offset, t.n_bytes)
            );
        }
    }
}

#[test]
fn ggml_and_ferrite_both_refuse_a_truncated_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    sample(32)
        .write_file(&path, false, |_, t, out| {
            out.write_all(&vec![0; t.n_bytes as usize])
        })
        .unwrap();
    // Cut inside the tensor infos (ggml, reading headers only, does not check the data's length; ferrite does).
    let bytes = std::fs::read(&path).unwrap();
    let header = GgufFile::open(&path).unwrap().header().data_offset as usize;
    std::fs::write(&path, &bytes[..header - 40]).unwrap();
    assert!(read_gguf_with_ggml(&path).is_err());
    assert!(GgufFile::open(&path).is_err());
}
