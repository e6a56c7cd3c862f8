//! Writes seed GGUF files for the fuzzer into `corpus/parse` (or the folder given as the only argument):
//! every metadata value type, arrays of every element type, nested arrays, several alignments, tensors of plain
//! and quantized types with 0 to 4 dimensions.

use std::path::PathBuf;

use gguf::{Array, GgmlType, Value, Writer};

fn scalars(w: &mut Writer) {
    w.set("general.architecture", Value::String("deepseek4".into()));
    w.set("general.name", Value::String("Tëst ✓".into()));
    w.set("general.empty", Value::String(String::new()));
    w.set("t.u8", Value::U8(0xAB));
    w.set("t.i8", Value::I8(-7));
    w.set("t.u16", Value::U16(0xBEEF));
    w.set("t.i16", Value::I16(-12345));
    w.set("t.u32", Value::U32(4096));
    w.set("t.i32", Value::I32(-1));
    w.set("t.f32", Value::F32(1e-6));
    w.set("t.bool", Value::Bool(true));
    w.set("t.u64", Value::U64(u64::MAX - 1));
    w.set("t.i64", Value::I64(i64::MIN));
    w.set("t.f64", Value::F64(2.5));
}

fn arrays(w: &mut Writer) {
    w.set("a.u8", Value::Array(Array::U8(vec![0, 1, 255])));
    w.set("a.i8", Value::Array(Array::I8(vec![-128, 127])));
    w.set("a.u16", Value::Array(Array::U16(vec![1, 65535])));
    w.set("a.i16", Value::Array(Array::I16(vec![-2, 3])));
    w.set("a.u32", Value::Array(Array::U32(vec![7, 8, 9])));
    w.set("a.i32", Value::Array(Array::I32(vec![-3, 2, 1])));
    w.set("a.f32", Value::Array(Array::F32(vec![0.5, -0.25])));
    w.set("a.bool", Value::Array(Array::Bool(vec![true, false])));
    w.set("a.str", Value::string_array(["a", "", "bcd", "ëf"]));
    w.set("a.u64", Value::Array(Array::U64(vec![0, u64::MAX])));
    w.set("a.i64", Value::Array(Array::I64(vec![i64::MIN, i64::MAX])));
    w.set("a.f64", Value::Array(Array::F64(vec![1.5])));
    w.set("a.empty", Value::Array(Array::U32(vec![])));
    w.set(
        "a.nested",
        Value::Array(Array::Array(vec![
            Array::U32(vec![1, 2]),
            Array::String(vec!["x".into()]),
            Array::Array(vec![Array::I8(vec![-1]), Array::Array(vec![Array::Bool(vec![false])])]),
        ])),
    );
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus/parse".into()));
    std::fs::create_dir_all(&dir).expect("create the corpus folder");
    let mut files: Vec<(&str, Writer)> = Vec::new();

    let mut w = Writer::new();
    scalars(&mut w);
    for (name, dims, ty) in [
        ("f32", &[8][..], GgmlType::F32),
        ("f16", &[4, 3], GgmlType::F16),
        ("q4_0", &[32, 2], GgmlType::Q4_0),
        ("q8_0", &[32, 1, 2], GgmlType::Q8_0),
        ("q4_k", &[256, 1, 1, 2], GgmlType::Q4K),
    ] {
        w.add_tensor(name, dims, ty).unwrap();
    }
    files.push(("scalars-tensors", w));

    let mut w = Writer::new();
    w.set_alignment(64).unwrap();
    arrays(&mut w);
    w.add_tensor("q6k", &[256], GgmlType::Q6K).unwrap();
    w.add_tensor("mxfp4", &[32, 2], GgmlType::Mxfp4).unwrap();
    files.push(("arrays-align64", w));

    let mut w = Writer::new();
    w.set_alignment(1).unwrap();
    w.set("s", Value::String("x".into()));
    w.add_tensor("i8", &[3], GgmlType::I8).unwrap();
    w.add_tensor("scalar", &[], GgmlType::F32).unwrap();
    w.add_tensor("empty", &[0, 4], GgmlType::Q8_0).unwrap();
    w.add_tensor("iq4nl", &[32], GgmlType::Iq4Nl).unwrap();
    files.push(("align1", w));

    files.push(("empty", Writer::new()));

    let mut w = Writer::new();
    w.set_alignment(16).unwrap();
    w.set(
        "tokenizer.ggml.tokens",
        Value::string_array((0..32).map(|i| format!("tok{i}"))),
    );
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32((0..32).map(|i| i as f32).collect())),
    );
    w.set("split.count", Value::U16(1));
    for (i, ty) in GgmlType::all().enumerate() {
        w.add_tensor(&format!("t{i}.{ty}"), &[ty.block_size()], ty).unwrap();
    }
    files.push(("vocab-every-type", w));

    let mut deep = Array::U8(vec![1]);
    for _ in 1..gguf::MAX_NESTING {
        deep = Array::Array(vec![deep]);
    }
    let mut w = Writer::new();
    w.set("deep", Value::Array(deep));
    files.push(("deep", w));

    for (name, w) in files {
        let mut bytes = Vec::new();
        w.write(&mut bytes, |i, t, sink| {
            sink.write_all(&vec![i as u8 ^ 0x5A; t.n_bytes as usize])
        })
        .expect("write seed");
        gguf::Header::parse(&bytes).expect("seed parses");
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, &bytes).expect("write seed file");
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
}
