//! The streaming safetensors writer (`quantize::safetensors_write`) against the reader (`quantize::safetensors`),
//! against the reference implementation (the PyPI `safetensors` package reads what it wrote), and on sharded
//! checkpoints with their index; plus its refusals (wrong byte counts, duplicates, too many shards).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use quantize::safetensors::{Checkpoint, Dtype, SafeTensors, INDEX_FILE, SINGLE_FILE};
use quantize::safetensors_write::{
    shard_name, split_into_shards, write_checkpoint, write_file, Layout, TensorEntry, WriteError,
};
use serde_json::Value as Json;

mod support;

use support::python;

/// A fresh, empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    support::scratch("safetensors_write", name)
}

/// Deterministic bytes of one tensor: a function of its name and position.
fn bytes_of(entry: &TensorEntry) -> Vec<u8> {
    let n = entry.byte_len().unwrap() as usize;
    let seed = entry
        .name
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..n)
        .map(|i| (seed.wrapping_add(i as u32).wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

fn fill(_: usize, entry: &TensorEntry, out: &mut dyn Write) -> std::io::Result<()> {
    // In odd-sized pieces, to exercise streaming.
    for piece in bytes_of(entry).chunks(7) {
        out.write_all(piece)?;
    }
    Ok(())
}

/// A mix of every dtype DeepSeek V4 checkpoints use, odd sizes first so alignment matters, a scalar and an empty
/// tensor.
fn mixed() -> Vec<TensorEntry> {
    vec![
        TensorEntry::new("a.fp8", Dtype::F8E4M3, &[3, 5]),
        TensorEntry::new("a.fp8.scale", Dtype::F8E8M0, &[1, 1]),
        TensorEntry::new("b.fp4", Dtype::I8, &[7, 3]),
        TensorEntry::new("c.bf16", Dtype::BF16, &[3, 3]),
        TensorEntry::new("d.f32", Dtype::F32, &[5]),
        TensorEntry::new("e.ids", Dtype::I64, &[3, 2]),
        TensorEntry::new("f.scalar", Dtype::F32, &[]),
        TensorEntry::new("g.empty", Dtype::BF16, &[0, 4]),
        TensorEntry::new("h \"quoted\" ünï", Dtype::U8, &[2]),
    ]
}

#[test]
fn single_file_round_trips_through_the_reader() {
    let dir = scratch("single");
    let path = dir.join("x.safetensors");
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let layout = Layout::new(mixed(), &metadata).unwrap();
    let size = write_file(&path, &layout, fill).unwrap();
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(raw.len() as u64, size);
    assert_eq!(size, layout.file_len());
    // Header: little-endian length, a multiple of 8, padded with spaces.
    let header_len = u64::from_le_bytes(raw[..8].try_into().unwrap());
    assert_eq!(header_len, layout.header_len());
    assert_eq!(header_len % 8, 0);
    let header = std::str::from_utf8(&raw[8..8 + header_len as usize]).unwrap();
    assert!(header.starts_with('{'));
    assert!(header.trim_end().ends_with('}'));
    assert!(header[header.trim_end().len()..].bytes().all(|b| b == b' '));
    assert!(!dir.join("x.safetensors.partial").exists());

    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.len(), mixed().len());
    assert_eq!(st.metadata()["format"], "pt");
    for e in mixed() {
        let t = st.tensor(&e.name).unwrap();
        assert_eq!(
            (t.dtype, t.shape),
            (e.dtype, e.shape.as_slice()),
            "{}",
            e.name
        );
        assert_eq!(t.bytes, bytes_of(&e).as_slice(), "{}", e.name);
    }
    let json: Json = serde_json::from_str(header.trim_end()).unwrap();
    let data_start = 8 + header_len;
    // Every tensor starts at a multiple of its element size in the file.
    for e in mixed() {
        let offsets = &json[&e.name]["data_offsets"];
        let begin = offsets[0].as_u64().unwrap();
        assert_eq!(
            (data_start + begin) % e.dtype.size(),
            0,
            "{} at {begin}",
            e.name
        );
    }
    // No metadata: no __metadata__ key.
    let bare = Layout::new(mixed(), &BTreeMap::new()).unwrap();
    write_file(&path, &bare, fill).unwrap();
    let st = SafeTensors::open(&path).unwrap();
    assert!(st.metadata().is_empty());
    assert_eq!(st.len(), mixed().len());
}

const PY_READER: &str = r#"
import json, sys
from safetensors import safe_open
out = {}
with safe_open(sys.argv[1], framework="numpy") as f:
    out["__metadata__"] = f.metadata()
    for name in f.keys():
        a = f.get_tensor(name)
        out[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "hex": a.astype(a.dtype.newbyteorder("<")).tobytes().hex()}
print(json.dumps(out))
"#;

#[test]
fn the_reference_implementation_reads_the_files() {
    let dir = scratch("reference");
    let path = dir.join("y.safetensors");
    // The dtypes numpy has (no float8, no bfloat16).
    let entries = vec![
        TensorEntry::new("i8", Dtype::I8, &[3, 7]),
        TensorEntry::new("f32", Dtype::F32, &[2, 3]),
        TensorEntry::new("i64", Dtype::I64, &[5, 1]),
        TensorEntry::new("u8", Dtype::U8, &[9]),
        TensorEntry::new("f16", Dtype::F16, &[3]),
        TensorEntry::new("scalar", Dtype::F32, &[]),
    ];
    let metadata = BTreeMap::from([("format".to_string(), "np".to_string())]);
    write_file(
        &path,
        &Layout::new(entries.clone(), &metadata).unwrap(),
        fill,
    )
    .unwrap();
    let out = Command::new(python())
        .arg("-c")
        .arg(PY_READER)
        .arg(&path)
        .output()
        .expect("cannot run the reference Python");
    assert!(
        out.status.success(),
        "safetensors reader failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["__metadata__"]["format"], "np");
    let np = |d: Dtype| match d {
        Dtype::I8 => "int8",
        Dtype::F32 => "float32",
        Dtype::I64 => "int64",
        Dtype::U8 => "uint8",
        Dtype::F16 => "float16",
        _ => unreachable!(),
    };
    for e in &entries {
        let t = &got[&e.name];
        assert_eq!(t["dtype"], np(e.dtype), "{}", e.name);
        let shape: Vec<u64> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(shape, e.shape, "{}", e.name);
        let hex: String = bytes_of(e).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(t["hex"], hex.as_str(), "{}", e.name);
    }
}

#[test]
fn sharded_checkpoint_round_trips_with_its_index() {
    let dir = scratch("sharded");
    let mut entries = mixed();
    for l in 0..6 {
        entries.push(TensorEntry::new(
            format!("layers.{l}.w"),
            Dtype::F8E4M3,
            &[40, 30],
        ));
        entries.push(TensorEntry::new(format!("layers.{l}.b"), Dtype::F32, &[10]));
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut calls = Vec::new();
    let written = write_checkpoint(&dir, &entries, 3, &metadata, |i, e, out| {
        calls.push(i);
        assert_eq!(e, &entries[i]);
        fill(i, e, out)
    })
    .unwrap();
    calls.sort();
    assert_eq!(
        calls,
        (0..entries.len()).collect::<Vec<_>>(),
        "each tensor once"
    );
    assert_eq!(written.n_tensors, entries.len());
    let names: Vec<String> = (1..=3).map(|k| shard_name(k, 3)).collect();
    assert_eq!(names[0], "model-00001-of-00003.safetensors");
    assert_eq!(
        written.shards,
        names.iter().map(|n| dir.join(n)).collect::<Vec<_>>()
    );
    assert_eq!(
        written.index.as_deref(),
        Some(dir.join(INDEX_FILE).as_path())
    );
    let total: u64 = entries.iter().map(|e| e.byte_len().unwrap()).sum();
    assert_eq!(written.total_size, total);
    let on_disk: u64 = written
        .shards
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(written.file_bytes, on_disk);

    let index: Json =
        serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], total);
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), entries.len());
    for n in &names {
        assert!(map.values().any(|v| v == n), "shard {n} is empty");
    }

    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.len(), entries.len());
    assert_eq!(ckpt.shards().len(), 3);
    for e in &entries {
        let t = ckpt.tensor(&e.name).unwrap();
        assert_eq!(
            (t.dtype, t.shape),
            (e.dtype, e.shape.as_slice()),
            "{}",
            e.name
        );
        assert_eq!(t.bytes, bytes_of(e).as_slice(), "{}", e.name);
        assert_eq!(
            ckpt.shards()
                .iter()
                .find(|s| s.contains(&e.name))
                .unwrap()
                .metadata()["format"],
            "pt"
        );
    }

    // One shard: a single model.safetensors, and the stale index goes.
    let one = write_checkpoint(&dir, &entries, 1, &metadata, fill).unwrap();
    assert_eq!(one.shards, vec![dir.join(SINGLE_FILE)]);
    assert_eq!(one.index, None);
    assert!(!dir.join(INDEX_FILE).exists());
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.len(), entries.len());
    assert_eq!(ckpt.shards().len(), 1);
}

#[test]
fn shards_split_evenly_and_never_empty() {
    // Equal sizes: equal counts.
    let s = split_into_shards(&[10; 12], 4).unwrap();
    assert_eq!(s, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
    // One huge tensor first: the rest still get a shard each.
    let s = split_into_shards(&[1000, 1, 1, 1], 4).unwrap();
    assert_eq!(s, vec![0, 1, 2, 3]);
    let s = split_into_shards(&[1, 1, 1, 1000], 2).unwrap();
    assert_eq!(s, vec![0, 0, 0, 1]);
    assert_eq!(split_into_shards(&[5, 5], 1).unwrap(), vec![0, 0]);
    for (n_tensors, n_shards) in [(7, 3), (50, 7), (5, 5), (100, 1)] {
        let sizes: Vec<u64> = (0..n_tensors).map(|i| (i * 37 % 11 + 1) as u64).collect();
        let s = split_into_shards(&sizes, n_shards).unwrap();
        assert_eq!(s.len(), n_tensors);
        assert!(s.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
        assert_eq!((s[0], s[n_tensors - 1]), (0, n_shards - 1));
    }
    assert!(matches!(
        split_into_shards(&[1, 2], 3),
        Err(WriteError::Shards {
            n_tensors: 2,
            shards: 3
        })
    ));
    assert!(matches!(
        split_into_shards(&[1, 2], 0),
        Err(WriteError::Shards { .. })
    ));
}

#[test]
fn refuses_bad_plans_and_bad_data() {
    let dir = scratch("refusals");
    let path = dir.join("z.safetensors");
    let dup = vec![
        TensorEntry::new("x", Dtype::F32, &[1]),
        TensorEntry::new("x", Dtype::I8, &[1]),
    ];
    assert!(matches!(
        Layout::new(dup.clone(), &BTreeMap::new()),
        Err(WriteError::Duplicate(n)) if n == "x"
    ));
    assert!(matches!(
        write_checkpoint(&dir, &dup, 2, &BTreeMap::new(), fill),
        Err(WriteError::Duplicate(_))
    ));
    assert!(matches!(
        Layout::new(
            vec![TensorEntry::new("__metadata__", Dtype::F32, &[1])],
            &BTreeMap::new()
        ),
        Err(WriteError::ReservedName(_))
    ));
    assert!(matches!(
        Layout::new(
            vec![TensorEntry::new("big", Dtype::F64, &[u64::MAX / 4, 3])],
            &BTreeMap::new()
        ),
        Err(WriteError::ShapeOverflow { .. })
    ));

    let layout = Layout::new(
        vec![
            TensorEntry::new("a", Dtype::F32, &[4]),
            TensorEntry::new("b", Dtype::I8, &[3]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    // Too few bytes, too many bytes, and an error from the callback: no file, no temporary left.
    let short = write_file(&path, &layout, |_, e, out| {
        out.write_all(&vec![0; e.byte_len().unwrap() as usize - 1])
    });
    assert!(
        matches!(short, Err(WriteError::WrongLength { ref tensor, expected: 16, got: 15, .. }) if tensor == "a"),
        "{short:?}"
    );
    let long = write_file(&path, &layout, |_, e, out| {
        out.write_all(&vec![0; e.byte_len().unwrap() as usize + 1])
    });
    assert!(
        matches!(long, Err(WriteError::WrongLength { .. })),
        "{long:?}"
    );
    let failing = write_file(&path, &layout, |i, e, out| {
        if i == 1 {
            return Err(std::io::Error::other("generator broke"));
        }
        out.write_all(&vec![0; e.byte_len().unwrap() as usize])
    });
    assert!(
        matches!(failing, Err(WriteError::Tensor { ref tensor, .. }) if tensor == "b"),
        "{failing:?}"
    );
    assert!(!path.exists());
    assert!(!dir.join("z.safetensors.partial").exists());
    // An existing file is replaced only by a complete one.
    write_file(&path, &layout, fill).unwrap();
    let before = std::fs::read(&path).unwrap();
    let _ = write_file(&path, &layout, |_, _, _| Ok(()));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // A folder that does not exist.
    assert!(matches!(
        write_file(&dir.join("no/such/dir.safetensors"), &layout, fill),
        Err(WriteError::Io { .. })
    ));
}
