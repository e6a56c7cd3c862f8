//! Loading: other architectures are refused, every missing or misshapen tensor and bad key is reported at once,
//! and metadata llama.cpp would misread is handled as DSV4.md section 5 says.

use std::path::Path;

use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use gguf::{GgufFile, Value, Writer};

fn open(path: &Path) -> anyhow::Result<Engine> {
    Engine::open(
        path,
        EngineOptions {
            n_threads: 1,
            fused_ops: true,
            cache_type: CacheType::F32,
            ..Default::default()
        },
    )
}

/// Rewrites `src` into `dst` after `edit` changes its metadata and tensor list (tensor data copied by name).
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Writer, &mut Vec<String>)) {
    let f = GgufFile::open(src).unwrap();
    let mut w = Writer::new();
    for (k, v) in f.metadata().iter() {
        w.set(k, v.clone());
    }
    let mut names: Vec<String> = f.header().tensors.iter().map(|t| t.name.clone()).collect();
    edit(&mut w, &mut names);
    for name in &names {
        let t = f.header().tensor(name).unwrap();
        w.add_tensor(name, &t.dims, t.ty).unwrap();
    }
    w.write_file(dst, true, |i, _, out| {
        let t = f.header().tensor(&names[i]).unwrap();
        out.write_all(f.tensor_data(t))
    })
    .unwrap();
}

fn message(r: anyhow::Result<Engine>) -> String {
    format!("{:#}", r.err().expect("the model was accepted"))
}

#[test]
fn loads_the_tiny_models() {
    let dir = tempfile::tempdir().unwrap();
    for (name, cfg) in [
        ("small", TinyConfig::small()),
        ("alt", TinyConfig::alt()),
        ("demo", TinyConfig::demo()),
    ] {
        let path = dir.path().join(format!("{name}.gguf"));
        write_tiny_model(&path, &cfg, 1).unwrap();
        let e = open(&path).unwrap();
        assert_eq!(e.config().n_layer, cfg.n_layer as usize);
        assert!(e.config().warnings.is_empty(), "{:?}", e.config().warnings);
    }
}

#[test]
fn refuses_other_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    let mut w = Writer::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.write_file(&path, false, |_, _, _| Ok(())).unwrap();
    let msg = message(open(&path));
    assert!(
        msg.contains("\"llama\"") && msg.contains("deepseek4"),
        "{msg}"
    );
}

#[test]
fn reports_every_missing_or_misshapen_tensor_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_tiny_model(&good, &TinyConfig::small(), 1).unwrap();
    let bad = dir.path().join("bad.gguf");
    rewrite(&good, &bad, |_, names| {
        names.retain(|n| {
            n != "blk.1.attn_kv.weight" && n != "output.weight" && n != "blk.3.indexer.proj.weight"
        });
    });
    let msg = message(open(&bad));
    for expected in [
        "blk.1.attn_kv.weight",
        "output.weight",
        "blk.3.indexer.proj.weight",
        "3 problems",
    ] {
        assert!(msg.contains(expected), "missing {expected:?} in: {msg}");
    }
}

#[test]
fn reports_bad_keys_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_tiny_model(&good, &TinyConfig::small(), 1).unwrap();
    let bad = dir.path().join("bad.gguf");
    rewrite(&good, &bad, |w, _| {
        w.set("deepseek4.expert_gating_func", Value::U32(1));
        w.set("deepseek4.attention.head_count_kv", Value::U32(4));
        w.set("deepseek4.hyper_connection.count", Value::I32(4));
    });
    let msg = message(open(&bad));
    for expected in [
        "expert_gating_func is 1",
        "head_count_kv is 4",
        "hyper_connection.count\" has type int32, expected uint32",
    ] {
        assert!(msg.contains(expected), "missing {expected:?} in: {msg}");
    }
}

#[test]
fn missing_rope_scaling_type_is_taken_as_yarn_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_tiny_model(&good, &TinyConfig::small(), 1).unwrap();
    let edited = dir.path().join("noscaling.gguf");
    rewrite(&good, &edited, |w, _| {
        assert!(w.remove("deepseek4.rope.scaling.type").is_some());
    });
    let e = open(&edited).unwrap();
    let original = open(&good).unwrap();
    assert_eq!(
        e.config().rope_compressed,
        original.config().rope_compressed
    );
    assert!(
        e.config()
            .warnings
            .iter()
            .any(|w| w.contains("rope.scaling.type")),
        "{:?}",
        e.config().warnings
    );
}
