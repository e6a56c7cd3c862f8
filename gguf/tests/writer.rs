//! The writer: round trips through the reader, a plan equal to the written file, identical rewrites,
//! atomic output, and split models opened as one.

use gguf::{Array, GgmlType, GgufFile, Header, Model, Value, Writer};

/// Deterministic bytes for tensor `i` of `n` bytes.
fn data(i: usize, n: u64) -> Vec<u8> {
    (0..n).map(|j| (j as usize * 31 + i * 7) as u8).collect()
}

fn sample_writer(alignment: Option<u32>) -> Writer {
    let mut w = Writer::new();
    w.set("general.architecture", Value::String("deepseek4".into()));
    if let Some(a) = alignment {
        w.set_alignment(a).unwrap();
    }
    w.set("v.u8", Value::U8(200));
    w.set("v.i8", Value::I8(-100));
    w.set("v.u16", Value::U16(60000));
    w.set("v.i16", Value::I16(-30000));
    w.set("v.u32", Value::U32(4_000_000_000));
    w.set("v.i32", Value::I32(-2_000_000_000));
    w.set("v.f32", Value::F32(-0.1));
    w.set("v.bool", Value::Bool(true));
    w.set("v.string", Value::String("héllo ｜DSML｜ 🦀".into()));
    w.set("v.empty", Value::String(String::new()));
    w.set("v.u64", Value::U64(u64::MAX));
    w.set("v.i64", Value::I64(i64::MIN));
    w.set("v.f64", Value::F64(std::f64::consts::PI));
    w.set("a.i32", Value::Array(Array::I32(vec![0, 0, 4, 128, 4, 0])));
    w.set(
        "a.f32",
        Value::Array(Array::F32(vec![10.0, f32::NAN, -0.0])),
    );
    w.set("a.bool", Value::Array(Array::Bool(vec![true, false])));
    w.set("a.str", Value::string_array(["a", "", "<｜User｜>"]));
    w.set("a.empty", Value::Array(Array::U64(vec![])));
    let nested = Array::Array(vec![
        Array::U8(vec![1, 2]),
        Array::String(vec!["x".into()]),
        Array::Array(vec![]),
    ]);
    w.set("a.nested", Value::Array(nested));
    w.add_tensor("token_embd.weight", &[64, 10], GgmlType::F16)
        .unwrap();
    w.add_tensor("blk.0.ffn_gate_exps.weight", &[256, 4, 3], GgmlType::Q4K)
        .unwrap();
    w.add_tensor("blk.0.ffn_gate_tid2eid.weight", &[2, 10], GgmlType::I32)
        .unwrap();
    w.add_tensor("one", &[1], GgmlType::F32).unwrap();
    w.add_tensor("x4", &[32, 2, 2, 2], GgmlType::Mxfp4).unwrap();
    w
}

fn write_bytes(w: &Writer) -> Vec<u8> {
    let mut out = Vec::new();
    w.write(&mut out, |i, t, sink| sink.write_all(&data(i, t.n_bytes)))
        .unwrap();
    out
}

#[test]
fn round_trip_every_value_type() {
    for alignment in [None, Some(64), Some(1), Some(4096)] {
        let w = sample_writer(alignment);
        let bytes = write_bytes(&w);
        let plan = w.plan().unwrap();
        assert_eq!(
            plan.total_bytes,
            bytes.len() as u64,
            "plan size for {alignment:?}"
        );
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(h.alignment, alignment.map_or(32, u64::from));
        assert_eq!(h.data_offset, plan.data_offset);
        // NaN != NaN, so compare the f32 array bitwise and the rest by value.
        for ((k1, v1), (k2, v2)) in h.metadata.iter().zip(w.metadata().iter()) {
            assert_eq!(k1, k2);
            match (v1, v2) {
                (Value::Array(Array::F32(a)), Value::Array(Array::F32(b))) => {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(a), bits(b));
                }
                _ => assert_eq!(v1, v2, "{k1}"),
            }
        }
        assert_eq!(h.metadata.len(), w.metadata().len());
        for (i, (t, p)) in h.tensors.iter().zip(w.tensors()).enumerate() {
            assert_eq!(
                (&t.name, &t.dims, t.ty, t.n_bytes),
                (&p.name, &p.dims, p.ty, p.n_bytes)
            );
            assert_eq!(t.offset, plan.tensor_offsets[i]);
            let start = (h.data_offset + t.offset) as usize;
            assert_eq!(
                &bytes[start..start + t.n_bytes as usize],
                &data(i, t.n_bytes)[..]
            );
        }
    }
}

#[test]
fn rewriting_unchanged_gives_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.gguf");
    let w = sample_writer(Some(64));
    w.write_file(&first, false, |i, t, sink| {
        sink.write_all(&data(i, t.n_bytes))
    })
    .unwrap();
    let f = GgufFile::open(&first).unwrap();
    let again = Writer::from_header(f.header()).unwrap();
    let second = dir.path().join("second.gguf");
    again
        .write_file(&second, false, |i, _, sink| {
            sink.write_all(f.tensor_data(&f.header().tensors[i]))
        })
        .unwrap();
    assert_eq!(
        std::fs::read(&first).unwrap(),
        std::fs::read(&second).unwrap()
    );
}

#[test]
fn write_file_is_atomic_and_careful() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let w = sample_writer(None);
    // A fill that fails half way leaves nothing behind.
    let err = w
        .write_file(&out, false, |i, t, sink| {
            if i == 2 {
                return Err(std::io::Error::other("disk full (simulated)"));
            }
            sink.write_all(&data(i, t.n_bytes))
        })
        .unwrap_err();
    assert!(err.to_string().contains("disk full (simulated)"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "partial output left behind"
    );
    // A fill that writes the wrong number of bytes is refused.
    let err = w
        .write_file(&out, false, |_, _, sink| sink.write_all(&[1, 2, 3]))
        .unwrap_err();
    assert!(
        err.to_string().contains("3 bytes of data were supplied"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // An existing file needs overwrite.
    std::fs::write(&out, b"keep me").unwrap();
    let err = w
        .write_file(&out, false, |i, t, s| s.write_all(&data(i, t.n_bytes)))
        .unwrap_err();
    assert!(err.to_string().contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    w.write_file(&out, true, |i, t, s| s.write_all(&data(i, t.n_bytes)))
        .unwrap();
    assert!(GgufFile::open(&out).is_ok());
}

#[test]
fn writer_refuses_bad_tensors() {
    let mut w = Writer::new();
    assert!(w.add_tensor("q", &[33], GgmlType::Q8_0).is_err());
    assert!(w
        .add_tensor("five", &[1, 1, 1, 1, 1], GgmlType::F32)
        .is_err());
    w.add_tensor("t", &[32], GgmlType::Q8_0).unwrap();
    assert!(w.add_tensor("t", &[32], GgmlType::Q8_0).is_err());
    assert!(w.set_alignment(48).is_err());
}

/// Writes a model split into `n` shards in llama.cpp's naming; returns the shard paths.
fn write_split(dir: &std::path::Path, n: u16) -> Vec<std::path::PathBuf> {
    let prefix = dir.join("tiny");
    let per_shard = 2;
    (0..n)
        .map(|s| {
            let mut w = Writer::new();
            if s == 0 {
                w.set("general.architecture", Value::String("deepseek4".into()));
            }
            w.set("split.no", Value::U16(s));
            w.set("split.count", Value::U16(n));
            w.set("split.tensors.count", Value::I32(i32::from(n) * per_shard));
            for t in 0..per_shard {
                w.add_tensor(&format!("t.{s}.{t}"), &[8], GgmlType::F32)
                    .unwrap();
            }
            let path = gguf::split_path(&prefix, u64::from(s) + 1, u64::from(n));
            w.write_file(&path, false, |i, t, sink| {
                sink.write_all(&data(i + 10 * s as usize, t.n_bytes))
            })
            .unwrap();
            path
        })
        .collect()
}

#[test]
fn split_model_opens_as_one_from_any_shard() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_split(dir.path(), 3);
    for p in &paths {
        let m = Model::open(p).unwrap();
        assert_eq!(m.shards().len(), 3);
        assert_eq!(m.tensors().len(), 6);
        assert_eq!(
            m.metadata().str("general.architecture").unwrap(),
            "deepseek4"
        );
        let t = m.tensor("t.2.1").unwrap();
        assert_eq!(t.shard, 2);
        assert_eq!(m.tensor_data(t), &data(1 + 20, 32)[..]);
    }
}

#[test]
fn split_model_errors() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_split(dir.path(), 3);
    std::fs::remove_file(&paths[1]).unwrap();
    let err = Model::open(&paths[0]).err().unwrap();
    assert!(err.to_string().contains("shard 2 of 3 is missing"), "{err}");
    // A renamed shard cannot find its siblings.
    let renamed = dir.path().join("renamed.gguf");
    std::fs::rename(&paths[0], &renamed).unwrap();
    let err = Model::open(&renamed).err().unwrap();
    assert!(
        err.to_string().contains("NAME-00001-of-00003.gguf"),
        "{err}"
    );
}

/// A sparse write gives the same bytes as a plain one, and leaves the long zero runs (in the middle and at the
/// end of the file) as holes where the filesystem has them.
#[test]
fn sparse_write_gives_the_same_bytes_with_holes() {
    let mut w = Writer::new();
    w.set("general.architecture", Value::String("deepseek4".into()));
    let zeros_mid = 4u64 << 20;
    let zeros_end = 3u64 << 20;
    w.add_tensor("a", &[1000], GgmlType::F32).unwrap();
    w.add_tensor("zeros_mid", &[zeros_mid / 4], GgmlType::F32)
        .unwrap();
    w.add_tensor("b", &[3000], GgmlType::F32).unwrap();
    w.add_tensor("zeros_end", &[zeros_end / 4], GgmlType::F32)
        .unwrap();
    let fill = |i: usize, t: &gguf::PlannedTensor, sink: &mut dyn std::io::Write| match i {
        1 | 3 => {
            // In pieces, as a generator writes a large tensor.
            let piece = vec![0u8; 1 << 20];
            for _ in 0..t.n_bytes / piece.len() as u64 {
                sink.write_all(&piece)?;
            }
            Ok(())
        }
        _ => sink.write_all(&data(i, t.n_bytes)),
    };
    let dir = tempfile::tempdir().unwrap();
    let (plain, sparse) = (
        dir.path().join("plain.gguf"),
        dir.path().join("sparse.gguf"),
    );
    w.write_file(&plain, false, fill).unwrap();
    let layout = w.write_file_sparse(&sparse, false, fill).unwrap();
    let bytes = std::fs::read(&sparse).unwrap();
    assert_eq!(bytes.len() as u64, layout.total_bytes);
    assert!(
        bytes == std::fs::read(&plain).unwrap(),
        "sparse and plain files differ"
    );
    use std::os::unix::fs::MetadataExt;
    let allocated = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let (a_plain, a_sparse) = (allocated(&plain), allocated(&sparse));
    eprintln!("allocated: plain {a_plain} bytes, sparse {a_sparse} bytes");
    // A filesystem without holes allocates both alike; with holes, the 7 MiB of zeros are not on disk.
    if a_plain >= zeros_mid + zeros_end {
        assert!(
            a_sparse + (6 << 20) <= a_plain,
            "the zero runs were written: plain {a_plain} bytes allocated, sparse {a_sparse}"
        );
    }
}
