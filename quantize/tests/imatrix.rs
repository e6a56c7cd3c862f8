//! The importance-matrix reader: GGUF files written with ferrite's writer and with the reference writer (the
//! PyPI `gguf` package), legacy `.dat` files written byte by byte, per-expert entries, and corrupt files.

use std::path::{Path, PathBuf};
use std::process::Command;

use gguf::{Array, GgmlType, Value, Writer};
use quantize::imatrix::{ImatrixData, ImatrixError, ImatrixFormat};

mod support;

use support::python;

/// A fresh, empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    support::scratch("imatrix", name)
}

fn le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A tensor of a GGUF imatrix: name, ggml shape, type, bytes.
struct T {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    bytes: Vec<u8>,
}

fn f32_tensor(name: &str, dims: &[u64], values: &[f32]) -> T {
    T {
        name: name.into(),
        dims: dims.to_vec(),
        ty: GgmlType::F32,
        bytes: le(values),
    }
}

/// The sums and counts of one entry, shaped as llama-imatrix writes them ({n_per_row, n_mat} and {1, n_mat}).
fn entry(name: &str, n_per_row: u64, sums: &[f32], counts: &[f32]) -> [T; 2] {
    let n_mat = counts.len() as u64;
    [
        f32_tensor(&format!("{name}.in_sum2"), &[n_per_row, n_mat], sums),
        f32_tensor(&format!("{name}.counts"), &[1, n_mat], counts),
    ]
}

fn standard_metadata(w: &mut Writer) {
    w.set("general.type", Value::String("imatrix".into()));
    w.set(
        "imatrix.datasets",
        Value::string_array(["wiki.train.raw", "code.txt"]),
    );
    w.set("imatrix.chunk_count", Value::U32(42));
    w.set("imatrix.chunk_size", Value::U32(512));
}

fn write_gguf(path: &Path, tensors: &[T], metadata: impl FnOnce(&mut Writer)) {
    let mut w = Writer::new();
    metadata(&mut w);
    for t in tensors {
        w.add_tensor(&t.name, &t.dims, t.ty).unwrap();
    }
    w.write_file(path, true, |i, _, sink| sink.write_all(&tensors[i].bytes))
        .unwrap();
}

/// Deterministic non-negative sums.
fn sums(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 + seed * 11) % 101) as f32 * 0.25 + 0.5)
        .collect()
}

#[test]
fn gguf_format_weights_are_sums_over_counts() {
    let dir = scratch("gguf");
    let path = dir.join("imatrix.gguf");
    let q = sums(8, 1);
    let up = sums(8, 2);
    let exps = sums(16 * 4, 3);
    let exp_counts = [10.0, 0.0, 5.0, 2.5];
    let mut tensors = Vec::new();
    // One matrix, stored 1-D as ggml does when the trailing dimension is 1.
    tensors.push(f32_tensor("blk.0.attn_q_a.weight.in_sum2", &[8], &q));
    tensors.push(f32_tensor("blk.0.attn_q_a.weight.counts", &[1], &[4.0]));
    // One matrix, stored 2-D.
    tensors.extend(entry("blk.0.ffn_up.weight", 8, &up, &[3.0]));
    // Four experts, one never routed to.
    tensors.extend(entry("blk.1.ffn_up_exps.weight", 16, &exps, &exp_counts));
    // Plain sums (newer llama-imatrix) and unrelated tensors are ignored.
    tensors.push(f32_tensor(
        "blk.0.ffn_up.weight.in_sum",
        &[8, 1],
        &[-1.0; 8],
    ));
    tensors.push(f32_tensor("something.else", &[3], &[f32::NAN; 3]));
    write_gguf(&path, &tensors, standard_metadata);

    let m = ImatrixData::read(&path).unwrap();
    assert_eq!(m.format(), ImatrixFormat::Gguf);
    assert_eq!(m.len(), 3);
    assert_eq!(
        m.names().collect::<Vec<_>>(),
        [
            "blk.0.attn_q_a.weight",
            "blk.0.ffn_up.weight",
            "blk.1.ffn_up_exps.weight"
        ]
    );
    assert_eq!(m.datasets(), ["wiki.train.raw", "code.txt"]);
    assert_eq!(m.chunks(), Some(42));
    assert_eq!(m.chunk_size(), Some(512));
    assert_eq!(m.path(), path);

    let e = m.get("blk.0.attn_q_a.weight").unwrap();
    assert_eq!((e.n_per_row, e.n_mat), (8, 1));
    let expected: Vec<f32> = q.iter().map(|s| s / 4.0).collect();
    assert_eq!(e.values, &expected[..]);

    let e = m.get("blk.0.ffn_up.weight").unwrap();
    let expected: Vec<f32> = up.iter().map(|s| s / 3.0).collect();
    assert_eq!(e.values, &expected[..]);

    let e = m.get("blk.1.ffn_up_exps.weight").unwrap();
    assert_eq!((e.n_per_row, e.n_mat, e.values.len()), (16, 4, 64));
    for (x, &count) in exp_counts.iter().enumerate() {
        let got = e.matrix(x).unwrap();
        let expected: Vec<f32> = if count > 0.0 {
            exps[x * 16..][..16].iter().map(|s| s / count).collect()
        } else {
            vec![1.0; 16]
        };
        assert_eq!(got, &expected[..], "expert {x}");
        assert_eq!(&e.values[x * 16..][..16], got);
    }
    assert_eq!(e.matrix(4), None);
    assert!(m.get("blk.2.ffn_up_exps.weight").is_none());
    assert!(m.get("something.else").is_none());

    // Checked against the shape of the tensor being quantized, as llama.cpp checks.
    let w = m
        .weights_for("blk.1.ffn_up_exps.weight", &[16, 32, 4])
        .unwrap()
        .unwrap();
    assert_eq!((w.n_per_row, w.n_mat), (16, 4));
    assert!(m
        .weights_for("blk.0.ffn_up.weight", &[8, 100])
        .unwrap()
        .is_some());
    assert!(m.weights_for("missing", &[8, 100]).unwrap().is_none());
    for dims in [&[16, 32, 3][..], &[32, 32, 2], &[64, 32], &[16]] {
        let err = m.weights_for("blk.1.ffn_up_exps.weight", dims).unwrap_err();
        assert!(
            matches!(err, ImatrixError::ShapeMismatch { .. }),
            "{dims:?}: {err}"
        );
        assert!(err.to_string().contains("another model"), "{err}");
    }
}

#[test]
fn gguf_metadata_is_optional() {
    let dir = scratch("gguf-bare");
    let path = dir.join("bare.gguf");
    write_gguf(
        &path,
        &entry("output.weight", 4, &[1.0, 2.0, 3.0, 4.0], &[2.0]),
        |_| {},
    );
    let m = ImatrixData::read(&path).unwrap();
    assert_eq!(m.chunks(), None);
    assert_eq!(m.chunk_size(), None);
    assert!(m.datasets().is_empty());
    assert_eq!(
        m.get("output.weight").unwrap().values,
        &[0.5, 1.0, 1.5, 2.0]
    );
}

/// Legacy `.dat` bytes: entries (name, ncall, values), then the optional trailer (chunk count, dataset).
fn legacy(entries: &[(&str, i32, &[f32])], trailer: Option<(i32, &str)>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend((entries.len() as i32).to_le_bytes());
    for (name, ncall, values) in entries {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(ncall.to_le_bytes());
        b.extend((values.len() as i32).to_le_bytes());
        b.extend(le(values));
    }
    if let Some((chunks, dataset)) = trailer {
        b.extend(chunks.to_le_bytes());
        b.extend((dataset.len() as i32).to_le_bytes());
        b.extend(dataset.as_bytes());
    }
    b
}

#[test]
fn legacy_format_weights_are_values_over_ncall() {
    let dir = scratch("legacy");
    let path = dir.join("imatrix.dat");
    let a = sums(8, 4);
    let exps = sums(16 * 4, 5);
    let zero_calls = [2.0f32, 0.0, 7.5];
    let bytes = legacy(
        &[
            ("blk.0.attn_kv.weight", 3, &a),
            ("blk.3.ffn_gate_exps.weight", 8, &exps),
            ("blk.9.never.weight", 0, &zero_calls),
        ],
        Some((100, "calibration.txt")),
    );
    std::fs::write(&path, &bytes).unwrap();
    let m = ImatrixData::read(&path).unwrap();
    assert_eq!(m.format(), ImatrixFormat::Legacy);
    assert_eq!(m.len(), 3);
    assert_eq!(m.chunks(), Some(100));
    assert_eq!(m.chunk_size(), None);
    assert_eq!(m.datasets(), ["calibration.txt"]);

    let e = m.get("blk.0.attn_kv.weight").unwrap();
    let expected: Vec<f32> = a.iter().map(|v| v / 3.0).collect();
    assert_eq!((e.n_per_row, e.n_mat, e.values), (8, 1, &expected[..]));
    // ncall 0: the values as stored.
    assert_eq!(m.get("blk.9.never.weight").unwrap().values, &zero_calls);

    // The legacy format does not record the expert count: the tensor's shape splits the values.
    let expected: Vec<f32> = exps.iter().map(|v| v / 8.0).collect();
    let e = m.get("blk.3.ffn_gate_exps.weight").unwrap();
    assert_eq!((e.n_per_row, e.n_mat), (64, 1));
    let w = m
        .weights_for("blk.3.ffn_gate_exps.weight", &[16, 2048, 4])
        .unwrap()
        .unwrap();
    assert_eq!((w.n_per_row, w.n_mat), (16, 4));
    for x in 0..4 {
        assert_eq!(w.matrix(x).unwrap(), &expected[x * 16..][..16]);
    }
    let err = m
        .weights_for("blk.3.ffn_gate_exps.weight", &[16, 2048, 3])
        .unwrap_err();
    assert!(matches!(err, ImatrixError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn legacy_trailer_is_optional() {
    let dir = scratch("legacy-trailer");
    let path = dir.join("old.dat");
    let entries: &[(&str, i32, &[f32])] = &[("t.weight", 2, &[4.0, 8.0])];
    // No trailer at all (the oldest files).
    std::fs::write(&path, legacy(entries, None)).unwrap();
    let m = ImatrixData::read(&path).unwrap();
    assert_eq!((m.chunks(), m.datasets().len()), (None, 0));
    assert_eq!(m.get("t.weight").unwrap().values, &[2.0, 4.0]);
    // Only the chunk count.
    let mut b = legacy(entries, None);
    b.extend(7i32.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let m = ImatrixData::read(&path).unwrap();
    assert_eq!((m.chunks(), m.datasets().len()), (Some(7), 0));
    // An empty dataset name.
    std::fs::write(&path, legacy(entries, Some((5, "")))).unwrap();
    let m = ImatrixData::read(&path).unwrap();
    assert_eq!((m.chunks(), m.datasets().len()), (Some(5), 0));
}

/// Reads `bytes` as a file, expecting an error; returns it.
fn read_err(dir: &Path, name: &str, bytes: &[u8]) -> ImatrixError {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = ImatrixData::read(&path).expect_err(name);
    let msg = err.to_string();
    assert!(msg.contains(&*path.to_string_lossy()), "{name}: {msg}");
    err
}

#[test]
fn corrupt_legacy_files_are_errors() {
    let dir = scratch("legacy-corrupt");
    let good = legacy(
        &[("a.weight", 2, &[1.0, 2.0, 3.0]), ("b.weight", 1, &[5.0])],
        Some((9, "data.txt")),
    );
    // Every truncation is an error, except at the two places the optional trailer may start and end early.
    let entries_end = good.len() - 4 - 4 - "data.txt".len();
    for len in 0..good.len() {
        let path = dir.join("cut.dat");
        std::fs::write(&path, &good[..len]).unwrap();
        match ImatrixData::read(&path) {
            Ok(_) => assert!(
                len == entries_end || len == entries_end + 4,
                "a file cut at {len} bytes was accepted"
            ),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    matches!(
                        e,
                        ImatrixError::Truncated { .. } | ImatrixError::NoEntries { .. }
                    ),
                    "cut at {len}: {msg}"
                );
            }
        }
    }
    let with = |patch: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        patch(&mut b);
        b
    };
    let at_i32 =
        |b: &mut Vec<u8>, at: usize, v: i32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    // Offsets in `good`: entry count 0, name length 4, name 8..16, ncall 16, nval 20, values 24..36.
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("zero entries", with(&|b| at_i32(b, 0, 0)), "entry count"),
        (
            "negative entries",
            with(&|b| at_i32(b, 0, -3)),
            "entry count",
        ),
        (
            "huge entries",
            with(&|b| at_i32(b, 0, i32::MAX)),
            "truncated",
        ),
        ("negative name", with(&|b| at_i32(b, 4, -1)), "name length"),
        ("huge name", with(&|b| at_i32(b, 4, i32::MAX)), "truncated"),
        ("negative ncall", with(&|b| at_i32(b, 16, -2)), "ncall"),
        ("zero nval", with(&|b| at_i32(b, 20, 0)), "value count"),
        ("negative nval", with(&|b| at_i32(b, 20, -5)), "value count"),
        ("huge nval", with(&|b| at_i32(b, 20, i32::MAX)), "truncated"),
        (
            "nan value",
            with(&|b| b[28..32].copy_from_slice(&f32::NAN.to_le_bytes())),
            "NaN",
        ),
        (
            "negative value",
            with(&|b| b[24..28].copy_from_slice(&(-1.0f32).to_le_bytes())),
            "negative",
        ),
        (
            "infinite value",
            with(&|b| b[32..36].copy_from_slice(&f32::INFINITY.to_le_bytes())),
            "infinite",
        ),
        ("bad utf8 name", with(&|b| b[8] = 0xff), "UTF-8"),
        (
            "trailing bytes",
            with(&|b| b.extend([1, 2, 3])),
            "unexpected bytes",
        ),
        (
            "negative chunks",
            with(&|b| at_i32(b, entries_end, -1)),
            "chunk count",
        ),
        (
            "negative dataset length",
            with(&|b| at_i32(b, entries_end + 4, -1)),
            "dataset name length",
        ),
        (
            "huge dataset length",
            with(&|b| at_i32(b, entries_end + 4, 1000)),
            "truncated",
        ),
        (
            "duplicate entry",
            legacy(&[("a.w", 1, &[1.0]), ("a.w", 1, &[2.0])], None),
            "twice",
        ),
        ("empty file", Vec::new(), "no importance matrix entries"),
    ];
    for (name, bytes, expect) in cases {
        let err = read_err(&dir, "bad.dat", &bytes);
        assert!(
            err.to_string().contains(expect),
            "{name}: {err} (expected {expect:?})"
        );
    }
    let err = ImatrixData::read(&dir.join("does-not-exist.dat")).unwrap_err();
    assert!(matches!(err, ImatrixError::Io { .. }), "{err}");
}

#[test]
fn corrupt_gguf_files_are_errors() {
    let dir = scratch("gguf-corrupt");
    let path = dir.join("x.gguf");
    let ok = entry("a.weight", 4, &[1.0, 2.0, 3.0, 4.0], &[1.0]);
    type Case = (&'static str, Vec<T>, Box<dyn Fn(&mut Writer)>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "sums without counts",
            vec![f32_tensor("a.weight.in_sum2", &[4, 1], &[1.0; 4])],
            Box::new(standard_metadata),
            "has no a.weight.counts",
        ),
        (
            "counts without sums",
            vec![f32_tensor("a.weight.counts", &[1, 1], &[1.0])],
            Box::new(standard_metadata),
            "has no a.weight.in_sum2",
        ),
        (
            "counts of the wrong length",
            vec![
                f32_tensor("a.weight.in_sum2", &[2, 2], &[1.0; 4]),
                f32_tensor("a.weight.counts", &[1, 3], &[1.0; 3]),
            ],
            Box::new(standard_metadata),
            "3 values for the 2 matrices",
        ),
        (
            "f16 sums",
            vec![
                T {
                    name: "a.weight.in_sum2".into(),
                    dims: vec![4, 1],
                    ty: GgmlType::F16,
                    bytes: vec![0; 8],
                },
                f32_tensor("a.weight.counts", &[1, 1], &[1.0]),
            ],
            Box::new(standard_metadata),
            "expected F32",
        ),
        (
            "3-d sums",
            vec![
                f32_tensor("a.weight.in_sum2", &[2, 2, 2], &[1.0; 8]),
                f32_tensor("a.weight.counts", &[1, 4], &[1.0; 4]),
            ],
            Box::new(standard_metadata),
            "expected {n_per_row, n_mat}",
        ),
        (
            "nan sum",
            entry("a.weight", 2, &[1.0, f32::NAN], &[1.0]).into(),
            Box::new(standard_metadata),
            "NaN",
        ),
        (
            "negative sum under a zero count",
            entry("a.weight", 2, &[1.0, 1.0, -1.0, 1.0], &[1.0, 0.0]).into(),
            Box::new(standard_metadata),
            "negative",
        ),
        (
            "negative count",
            entry("a.weight", 2, &[1.0; 4], &[1.0, -2.0]).into(),
            Box::new(standard_metadata),
            "count of matrix 1 is -2",
        ),
        (
            "nan count",
            entry("a.weight", 2, &[1.0; 2], &[f32::NAN]).into(),
            Box::new(standard_metadata),
            "count of matrix 0 is NaN",
        ),
        (
            "overflowing weight",
            entry("a.weight", 1, &[3e38], &[1e-10]).into(),
            Box::new(standard_metadata),
            "infinite",
        ),
        (
            "no tensors",
            vec![],
            Box::new(standard_metadata),
            "no importance matrix entries",
        ),
        (
            "only other tensors",
            vec![f32_tensor("token_embd.weight", &[4], &[0.0; 4])],
            Box::new(standard_metadata),
            "no importance matrix entries",
        ),
        (
            "datasets not strings",
            ok.iter().map(clone_t).collect(),
            Box::new(|w: &mut Writer| w.set("imatrix.datasets", Value::Array(Array::U32(vec![1])))),
            "imatrix.datasets",
        ),
        (
            "datasets a string",
            ok.iter().map(clone_t).collect(),
            Box::new(|w: &mut Writer| w.set("imatrix.datasets", Value::String("x".into()))),
            "imatrix.datasets",
        ),
        (
            "chunk count a string",
            ok.iter().map(clone_t).collect(),
            Box::new(|w: &mut Writer| w.set("imatrix.chunk_count", Value::String("42".into()))),
            "imatrix.chunk_count",
        ),
        (
            "negative chunk size",
            ok.iter().map(clone_t).collect(),
            Box::new(|w: &mut Writer| w.set("imatrix.chunk_size", Value::I32(-1))),
            "imatrix.chunk_size",
        ),
    ];
    for (name, tensors, md, expect) in cases {
        write_gguf(&path, &tensors, md);
        let err = ImatrixData::read(&path).expect_err(name);
        let msg = err.to_string();
        assert!(msg.contains(expect), "{name}: {msg} (expected {expect:?})");
        assert!(msg.contains(&*path.to_string_lossy()), "{name}: {msg}");
    }

    // A valid file cut anywhere before the end of its last tensor's data (the padding after it is optional)
    // is an error, never a panic.
    write_gguf(&path, &ok, standard_metadata);
    let good = std::fs::read(&path).unwrap();
    assert!(ImatrixData::read(&path).is_ok());
    let header = gguf::GgufFile::open(&path).unwrap().header().clone();
    let data_end = header
        .tensors
        .iter()
        .map(|t| header.data_offset + t.offset + t.n_bytes)
        .max()
        .unwrap() as usize;
    for len in 0..data_end {
        let cut = dir.join("cut.gguf");
        std::fs::write(&cut, &good[..len]).unwrap();
        let err = ImatrixData::read(&cut).expect_err("truncated file accepted");
        if len >= 4 {
            assert!(
                matches!(err, ImatrixError::Gguf { .. }),
                "cut at {len}: {err}"
            );
        }
    }
}

fn clone_t(t: &T) -> T {
    T {
        name: t.name.clone(),
        dims: t.dims.clone(),
        ty: t.ty,
        bytes: t.bytes.clone(),
    }
}

/// xorshift64*: deterministic noise for the mutation test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn mutated_files_never_panic() {
    let dir = scratch("mutate");
    let gguf_path = dir.join("seed.gguf");
    let mut tensors: Vec<T> = entry("a.weight", 4, &sums(8, 1), &[2.0, 0.0]).into();
    tensors.extend(entry("b.weight", 8, &sums(8, 2), &[1.0]));
    write_gguf(&gguf_path, &tensors, standard_metadata);
    let seeds = [
        std::fs::read(&gguf_path).unwrap(),
        legacy(
            &[("a.weight", 2, &sums(6, 3)), ("b.weight", 0, &sums(4, 4))],
            Some((3, "d.txt")),
        ),
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let path = dir.join("m.bin");
    for round in 0..3000 {
        let mut b = seeds[round % 2].clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() % b.len() as u64) as usize;
            match rng.next() % 3 {
                0 => b[at] ^= 1 << (rng.next() % 8),
                1 => b[at] = rng.next() as u8,
                _ => b[at] = [0x00, 0xff, 0x7f, 0x80][(rng.next() % 4) as usize],
            }
        }
        std::fs::write(&path, &b).unwrap();
        // Any outcome but a panic; accepted files hold only sane weights.
        if let Ok(m) = ImatrixData::read(&path) {
            for name in m.names() {
                let e = m.get(name).unwrap();
                assert_eq!(e.values.len(), e.n_per_row * e.n_mat);
                assert!(e.values.iter().all(|v| v.is_finite() && *v >= 0.0));
            }
        }
    }
}

/// Writes an imatrix with the reference writer (gguf-py's GGUFWriter), as llama-imatrix lays it out.
const PY_WRITER: &str = r#"
import sys
import numpy as np
import gguf
path = sys.argv[1]
w = gguf.GGUFWriter(path, "")
w.add_string("general.type", "imatrix")
w.add_array("imatrix.datasets", ["train.txt"])
w.add_uint32("imatrix.chunk_count", 17)
w.add_uint32("imatrix.chunk_size", 256)
# numpy shape (n_mat, n_per_row): the file stores {n_per_row, n_mat}.
exps = (np.arange(3 * 32, dtype=np.float32) * 0.5).reshape(3, 32)
w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", exps)
w.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[4.0], [0.0], [8.0]], dtype=np.float32))
dense = np.arange(64, dtype=np.float32).reshape(1, 64)
w.add_tensor("blk.0.attn_out.weight.in_sum2", dense)
w.add_tensor("blk.0.attn_out.weight.counts", np.array([[16.0]], dtype=np.float32))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"#;

#[test]
fn gguf_imatrix_from_the_reference_writer() {
    let dir = scratch("pyref");
    let path = dir.join("py.imatrix.gguf");
    let out = Command::new(python())
        .arg("-c")
        .arg(PY_WRITER)
        .arg(&path)
        .output()
        .expect("cannot run the reference Python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = ImatrixData::read(&path).unwrap();
    assert_eq!(m.datasets(), ["train.txt"]);
    assert_eq!((m.chunks(), m.chunk_size()), (Some(17), Some(256)));
    let e = m
        .weights_for("blk.0.ffn_down_exps.weight", &[32, 7, 3])
        .unwrap()
        .unwrap();
    for (x, count) in [(0usize, 4.0f32), (1, 0.0), (2, 8.0)] {
        let expected: Vec<f32> = (0..32)
            .map(|i| {
                if count > 0.0 {
                    (x * 32 + i) as f32 * 0.5 / count
                } else {
                    1.0
                }
            })
            .collect();
        assert_eq!(e.matrix(x).unwrap(), &expected[..], "expert {x}");
    }
    let e = m.get("blk.0.attn_out.weight").unwrap();
    assert_eq!((e.n_per_row, e.n_mat), (64, 1));
    let expected: Vec<f32> = (0..64).map(|i| i as f32 / 16.0).collect();
    assert_eq!(e.values, &expected[..]);
}
