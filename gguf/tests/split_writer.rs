//! Split (sharded) writing in llama.cpp's layout: shards of bounded size, read back as one model; metadata only
//! in the first shard; split keys of the exact GGUF types; atomic output over all shards; overwrite refused.

#[path = "support/reference_python.rs"]
mod reference_python;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use gguf::{
    Array, GgmlType, GgufFile, Model, Value, Writer, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT,
};
use reference_python::{python, repo_root};

/// Deterministic bytes for tensor `i` (its index over all shards) of `n` bytes.
fn data(i: usize, n: u64) -> Vec<u8> {
    (0..n)
        .map(|j| (j as usize * 13 + i * 101 + 7) as u8)
        .collect()
}

fn fill_ok(i: usize, t: &gguf::PlannedTensor, sink: &mut dyn Write) -> std::io::Result<()> {
    sink.write_all(&data(i, t.n_bytes))
}

/// A writer with some metadata and tensors of the given row counts (F32 rows of 64 values = 256 bytes, so a
/// tensor of `r` rows holds `r * 256` bytes, already a multiple of the default alignment).
fn writer(rows: &[u64], alignment: Option<u32>) -> Writer {
    let mut w = Writer::new();
    w.set("general.architecture", Value::String("deepseek4".into()));
    if let Some(a) = alignment {
        w.set_alignment(a).unwrap();
    }
    w.set("general.name", Value::String("split test".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::string_array(["<s>", "</s>", "héllo"]),
    );
    w.set("deepseek4.block_count", Value::U32(rows.len() as u32));
    for (i, &r) in rows.iter().enumerate() {
        w.add_tensor(&format!("blk.{i}.ffn_up.weight"), &[64, r], GgmlType::F32)
            .unwrap();
    }
    w
}

/// Names of the metadata keys of `md`, in file order.
fn keys(md: &gguf::Metadata) -> Vec<String> {
    md.iter().map(|(k, _)| k.to_string()).collect()
}

fn dir_entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The planned size of `shard` with `extra` (a further tensor of the original writer) appended, built
/// independently of the splitter (to check that the greedy split took as much as fits).
fn size_with(shard: &Writer, extra: &gguf::PlannedTensor) -> u64 {
    let mut w = Writer::new();
    for (k, v) in shard.metadata().iter() {
        w.set(k, v.clone());
    }
    for t in shard.tensors().iter().chain([extra]) {
        w.add_tensor(&t.name, &t.dims, t.ty).unwrap();
    }
    w.plan().unwrap().total_bytes
}

/// Splits, writes, reads back and checks everything the layout promises; returns the shard paths.
fn split_write_check(w: &Writer, max: u64, out: &Path) -> Vec<PathBuf> {
    let shards = w.split_by_size(max).unwrap();
    let n = shards.len();
    // Contiguous runs of the original tensors, in order.
    let flat: Vec<_> = shards.iter().flat_map(|s| s.tensors().to_vec()).collect();
    assert_eq!(flat, w.tensors());
    for (i, s) in shards.iter().enumerate() {
        assert!(!s.tensors().is_empty(), "shard {i} is empty");
        let size = s.plan().unwrap().total_bytes;
        assert!(
            size <= max || s.tensors().len() == 1,
            "shard {i} of {n}: {size} bytes > {max} with {} tensors",
            s.tensors().len()
        );
        if i + 1 < n {
            // Greedy: the next tensor would not have fit.
            let next = &shards[i + 1].tensors()[0];
            assert!(
                size_with(s, next) > max,
                "shard {i} could have taken {next:?}"
            );
        }
    }
    let planned = Writer::planned_total_bytes(&shards).unwrap();
    let written = Writer::write_files(&shards, out, false, fill_ok).unwrap();
    assert_eq!(written.len(), n);
    let mut on_disk = 0;
    for ((path, layout), shard) in written.iter().zip(&shards) {
        let len = std::fs::metadata(path).unwrap().len();
        assert_eq!(len, layout.total_bytes, "{}", path.display());
        assert_eq!(layout, &shard.plan().unwrap());
        on_disk += len;
    }
    assert_eq!(planned, on_disk);
    let paths: Vec<PathBuf> = written.into_iter().map(|(p, _)| p).collect();
    if n == 1 {
        assert_eq!(paths, [out.to_path_buf()]);
    } else {
        assert_eq!(paths, Writer::shard_paths(out, n).unwrap());
    }

    let original_keys = keys(w.metadata());
    for (i, p) in paths.iter().enumerate() {
        let f = GgufFile::open(p).unwrap();
        let md = f.metadata();
        if n == 1 {
            assert_eq!(keys(md), original_keys);
            continue;
        }
        // The split keys, with llama.cpp's exact types, last in every shard.
        assert_eq!(md.get(SPLIT_NO), Some(&Value::U16(i as u16)));
        assert_eq!(md.get(SPLIT_COUNT), Some(&Value::U16(n as u16)));
        assert_eq!(
            md.get(SPLIT_TENSORS_COUNT),
            Some(&Value::I32(w.tensors().len() as i32))
        );
        let split_keys = [SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT].map(String::from);
        let mut expected = if i == 0 {
            original_keys.clone()
        } else {
            // Only the alignment travels with the later shards, when it is set.
            original_keys
                .iter()
                .filter(|k| *k == "general.alignment")
                .cloned()
                .collect()
        };
        expected.extend(split_keys);
        assert_eq!(keys(md), expected, "{}", p.display());
        assert_eq!(f.header().alignment, w.alignment().unwrap());
    }
    // Opened as one model from any shard: every tensor, its bytes, metadata of the first shard.
    for p in &paths {
        let m = Model::open(p).unwrap();
        assert_eq!(m.shards().len(), n);
        assert_eq!(m.tensors().len(), w.tensors().len());
        // The model's metadata is the original's (and the split keys).
        for (k, v) in w.metadata().iter() {
            assert_eq!(m.metadata().get(k), Some(v), "{k}");
        }
        let mut shard_of = 0;
        for (i, t) in w.tensors().iter().enumerate() {
            let mt = m.tensor(&t.name).unwrap();
            assert_eq!((&mt.info.dims, mt.info.ty), (&t.dims, t.ty));
            assert_eq!(m.tensor_data(mt), &data(i, t.n_bytes)[..], "{}", t.name);
            assert!(mt.shard >= shard_of, "tensor order across shards");
            shard_of = mt.shard;
            assert!(shards[mt.shard].tensors().contains(t));
        }
    }
    paths
}

#[test]
fn one_shard_when_everything_fits() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(&[1, 2, 3], None);
    // Split keys inherited from a split input are dropped.
    w.set(SPLIT_NO, Value::U16(0));
    w.set(SPLIT_COUNT, Value::U16(4));
    w.set(SPLIT_TENSORS_COUNT, Value::I32(99));
    let mut plain = w.clone();
    for key in [SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT] {
        plain.remove(key);
    }
    let size = plain.plan().unwrap().total_bytes;
    for max in [size, u64::MAX] {
        let shards = w.split_by_size(max).unwrap();
        assert_eq!(shards.len(), 1);
        for key in [SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT] {
            assert!(!shards[0].metadata().contains(key), "{key}");
        }
    }
    let out = dir.path().join("model.gguf");
    split_write_check(&plain, size, &out);
    assert_eq!(
        dir_entries(dir.path()),
        BTreeSet::from(["model.gguf".into()])
    );
    // One byte less and it no longer fits in one file.
    assert!(w.split_by_size(size - 1).unwrap().len() > 1);
}

#[test]
fn two_shards() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(&[4, 4, 4, 4], None);
    let size = w.plan().unwrap().total_bytes;
    let shards = w.split_by_size(size * 3 / 4).unwrap();
    assert_eq!(shards.len(), 2);
    let out = dir.path().join("model.gguf");
    let paths = split_write_check(&w, size * 3 / 4, &out);
    assert_eq!(
        dir_entries(dir.path()),
        BTreeSet::from([
            "model-00001-of-00002.gguf".into(),
            "model-00002-of-00002.gguf".into()
        ])
    );
    assert_eq!(paths[0], dir.path().join("model-00001-of-00002.gguf"));
}

#[test]
fn many_shards_of_varied_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<u64> = (0..23).map(|i| 1 + (i * 7) % 5).collect();
    for alignment in [None, Some(64), Some(4096)] {
        let w = writer(&rows, alignment);
        for max in [2_000, 3_000, 5_000, 9_000] {
            let sub = dir.path().join(format!("a{alignment:?}-{max}"));
            std::fs::create_dir(&sub).unwrap();
            let paths = split_write_check(&w, max, &sub.join("out.gguf"));
            assert!(
                paths.len() >= 3,
                "{alignment:?} {max}: {} shards",
                paths.len()
            );
            assert_eq!(dir_entries(&sub).len(), paths.len());
        }
    }
}

#[test]
fn every_tensor_its_own_shard_when_max_is_tiny() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(&[1, 2, 1, 3, 1], None);
    let shards = w.split_by_size(0).unwrap();
    assert_eq!(shards.len(), 5);
    split_write_check(&w, 0, &dir.path().join("tiny.gguf"));
}

#[test]
fn a_tensor_larger_than_max_gets_its_own_shard() {
    let dir = tempfile::tempdir().unwrap();
    // 256-byte tensors around one of 40 KiB; shards of 2 KiB take a few small tensors each.
    let w = writer(&[1, 1, 160, 1, 1], None);
    let shards = w.split_by_size(2048).unwrap();
    let names: Vec<Vec<&str>> = shards
        .iter()
        .map(|s| s.tensors().iter().map(|t| t.name.as_str()).collect())
        .collect();
    assert_eq!(
        names,
        [
            vec!["blk.0.ffn_up.weight", "blk.1.ffn_up.weight"],
            vec!["blk.2.ffn_up.weight"],
            vec!["blk.3.ffn_up.weight", "blk.4.ffn_up.weight"],
        ]
    );
    assert!(shards[1].plan().unwrap().total_bytes > 2048);
    split_write_check(&w, 2048, &dir.path().join("big.gguf"));
    // A huge first tensor stays in the first shard, with the metadata.
    let w = writer(&[160, 1, 1], None);
    let shards = w.split_by_size(2048).unwrap();
    assert_eq!(shards.len(), 2);
    assert_eq!(shards[0].tensors().len(), 1);
    assert!(shards[0].metadata().contains("general.name"));
}

#[test]
fn failure_midway_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(&[2, 2, 2, 2, 2, 2], None);
    let shards = w.split_by_size(1500).unwrap();
    assert!(shards.len() >= 3);
    let out = dir.path().join("m.gguf");
    // Fails in the last shard, after the others were written completely.
    let last = w.tensors().len() - 1;
    let err = Writer::write_files(&shards, &out, false, |i, t, sink| {
        if i == last {
            return Err(std::io::Error::other("disk full (simulated)"));
        }
        fill_ok(i, t, sink)
    })
    .unwrap_err();
    assert!(err.to_string().contains("disk full (simulated)"), "{err}");
    assert!(
        dir_entries(dir.path()).is_empty(),
        "{:?}",
        dir_entries(dir.path())
    );
    // Fails in the first shard.
    let err = Writer::write_files(&shards, &out, false, |i, t, sink| {
        if i == 1 {
            sink.write_all(&[0; 10])?;
            return Err(std::io::Error::other("read error (simulated)"));
        }
        fill_ok(i, t, sink)
    })
    .unwrap_err();
    assert!(err.to_string().contains("read error (simulated)"), "{err}");
    assert!(dir_entries(dir.path()).is_empty());
    // A fill that supplies the wrong number of bytes.
    let err = Writer::write_files(&shards, &out, false, |i, t, sink| {
        if i == 3 {
            return sink.write_all(&[1, 2, 3]);
        }
        fill_ok(i, t, sink)
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("3 bytes of data were supplied"),
        "{err}"
    );
    assert!(dir_entries(dir.path()).is_empty());
    // And then it works.
    split_write_check(&w, 1500, &out);
}

#[test]
fn fill_sees_global_tensor_indices() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(&[1, 1, 1, 1, 1, 1, 1], None);
    let shards = w.split_by_size(1200).unwrap();
    assert!(shards.len() >= 3);
    let mut seen = Vec::new();
    Writer::write_files(&shards, &dir.path().join("g.gguf"), false, |i, t, sink| {
        seen.push((i, t.name.clone()));
        fill_ok(i, t, sink)
    })
    .unwrap();
    let expected: Vec<_> = w
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (i, t.name.clone()))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn existing_outputs_are_refused_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(&[2, 2, 2, 2], None);
    let shards = w.split_by_size(1500).unwrap();
    let n = shards.len();
    assert!(n >= 2);
    let out = dir.path().join("m.gguf");
    let paths = Writer::shard_paths(&out, n).unwrap();
    // Only the second shard exists: refused, and nothing else appears.
    std::fs::write(&paths[1], b"keep me").unwrap();
    let err = Writer::write_files(&shards, &out, false, fill_ok).unwrap_err();
    assert!(err.to_string().contains("--overwrite"), "{err}");
    assert!(
        err.to_string().contains(&*paths[1].to_string_lossy()),
        "{err}"
    );
    assert_eq!(dir_entries(dir.path()).len(), 1);
    assert_eq!(std::fs::read(&paths[1]).unwrap(), b"keep me");
    // With overwrite it is replaced.
    Writer::write_files(&shards, &out, true, fill_ok).unwrap();
    assert_eq!(Model::open(&paths[1]).unwrap().tensors().len(), 4);
    assert_eq!(dir_entries(dir.path()).len(), n);
    // A single-file output is refused the same way.
    let one = w.split_by_size(u64::MAX).unwrap();
    let single = dir.path().join("single.gguf");
    std::fs::write(&single, b"keep me too").unwrap();
    assert!(Writer::write_files(&one, &single, false, fill_ok).is_err());
    assert_eq!(std::fs::read(&single).unwrap(), b"keep me too");
}

#[test]
fn shard_names() {
    let d = Path::new("/m");
    let names = |p: &str, n| {
        Writer::shard_paths(&d.join(p), n)
            .unwrap()
            .into_iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names("out.gguf", 1), ["out.gguf"]);
    assert_eq!(
        names("out.gguf", 2),
        ["out-00001-of-00002.gguf", "out-00002-of-00002.gguf"]
    );
    assert_eq!(names("out", 2)[1], "out-00002-of-00002.gguf");
    assert_eq!(
        names("V4-Q4_K.bin", 3)[2],
        "V4-Q4_K.bin-00003-of-00003.gguf"
    );
    // A path already named like a shard gives its prefix.
    assert_eq!(
        names("out-00001-of-00002.gguf", 3)[0],
        "out-00001-of-00003.gguf"
    );
    assert!(Writer::shard_paths(&d.join("x.gguf"), 0).is_err());
    assert!(Writer::shard_paths(&d.join("x.gguf"), 10_000).is_err());
    assert!(Writer::shard_paths(Path::new("/"), 2).is_err());
}

#[test]
fn write_files_refuses_shards_that_do_not_belong_together() {
    let dir = tempfile::tempdir().unwrap();
    let a = writer(&[1], None);
    let err = Writer::write_files(
        &[a.clone(), a.clone()],
        &dir.path().join("x.gguf"),
        false,
        fill_ok,
    )
    .unwrap_err();
    assert!(err.to_string().contains("split_by_size"), "{err}");
    // Shards in the wrong order.
    let w = writer(&[2, 2, 2], None);
    let mut shards = w.split_by_size(1000).unwrap();
    assert!(shards.len() >= 2);
    shards.swap(0, 1);
    assert!(Writer::write_files(&shards, &dir.path().join("y.gguf"), false, fill_ok).is_err());
    assert!(Writer::write_files(&[], &dir.path().join("z.gguf"), false, fill_ok).is_err());
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn quantized_tensors_and_metadata_heavy_first_shard() {
    // Metadata larger than max: the first shard still takes one tensor, later shards stay small.
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::new();
    let tokens: Vec<String> = (0..2000).map(|i| format!("tok{i}")).collect();
    w.set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    for i in 0..6 {
        w.add_tensor(&format!("q.{i}"), &[256, 3], GgmlType::Q4K)
            .unwrap();
        w.add_tensor(&format!("m.{i}"), &[32, 5], GgmlType::Mxfp4)
            .unwrap();
    }
    let shards = w.split_by_size(2048).unwrap();
    assert!(shards[0].plan().unwrap().total_bytes > 2048);
    assert_eq!(shards[0].tensors().len(), 1);
    split_write_check(&w, 2048, &dir.path().join("q.gguf"));
}

#[test]
fn shards_read_by_the_reference_reader() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(&[1, 3, 2, 1, 2], Some(64));
    let paths = split_write_check(&w, 1500, &dir.path().join("ref.gguf"));
    assert!(paths.len() >= 3);
    let mut names = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let out = Command::new(python())
            .arg(repo_root().join("tests/py/gguf_ref.py"))
            .arg("dump")
            .arg(p)
            .output()
            .expect("cannot run the reference Python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let md = dump["metadata"].as_array().unwrap();
        let find = |key: &str| {
            md.iter()
                .find(|kv| kv[0] == key)
                .unwrap_or_else(|| panic!("{key} missing in shard {i}"))
        };
        assert_eq!(find(SPLIT_NO)[1], "uint16");
        assert_eq!(find(SPLIT_NO)[2], i);
        assert_eq!(find(SPLIT_COUNT)[1], "uint16");
        assert_eq!(find(SPLIT_COUNT)[2], paths.len());
        assert_eq!(find(SPLIT_TENSORS_COUNT)[1], "int32");
        assert_eq!(find(SPLIT_TENSORS_COUNT)[2], 5);
        assert_eq!(dump["alignment"], 64);
        assert_eq!(md.len(), if i == 0 { 8 } else { 4 });
        for t in dump["tensors"].as_array().unwrap() {
            names.push(t["name"].as_str().unwrap().to_string());
        }
    }
    let expected: Vec<String> = w.tensors().iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, expected);
}

/// `--overwrite` over an earlier split: when moving the old outputs aside fails midway (here the last one's place
/// aside, `.NAME.old-PID`, is taken by a folder), the ones already moved come back unchanged, no new shard appears
/// and nothing else is left.
#[test]
fn a_failed_rename_puts_the_old_outputs_back() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(&[2, 2, 2, 2, 2, 2], None);
    let shards = w.split_by_size(1500).unwrap();
    assert!(shards.len() >= 3);
    let out = dir.path().join("m.gguf");
    let paths = Writer::shard_paths(&out, shards.len()).unwrap();
    for (i, p) in paths.iter().enumerate() {
        std::fs::write(p, format!("old shard {i}")).unwrap();
    }
    let last = paths.last().unwrap();
    let name = last.file_name().unwrap().to_string_lossy().into_owned();
    let taken = last.with_file_name(format!(".{name}.old-{}", std::process::id()));
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("keep"), b"x").unwrap();
    let before = dir_entries(dir.path());
    let err = Writer::write_files(&shards, &out, true, fill_ok).unwrap_err();
    assert!(err.to_string().contains(&name), "{err}");
    assert_eq!(dir_entries(dir.path()), before);
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(p).unwrap(),
            format!("old shard {i}")
        );
    }
    // Without the obstacle the new shards replace the old ones and no old one is left aside.
    std::fs::remove_dir_all(&taken).unwrap();
    Writer::write_files(&shards, &out, true, fill_ok).unwrap();
    assert_eq!(dir_entries(dir.path()).len(), paths.len());
    for p in &paths {
        assert!(std::fs::read(p).unwrap().starts_with(b"GGUF"));
    }
}
