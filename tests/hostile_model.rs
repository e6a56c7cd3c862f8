//! Hostile model files past the parser (issue 15): hyper-parameters out of range, tensor types the CPU cannot
//! compute with, and routing tables naming experts that do not exist are refused at load with exit code 1 and a
//! message naming the key or tensor, the value and the allowed range, never an abort (134) or a crash (139).

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use gguf::{GgmlType, GgufFile, Value, Writer};
use support::cli::{run, text};

/// The demo model, written once per test into `dir`.
fn demo(dir: &Path) -> PathBuf {
    let path = dir.join("demo.gguf");
    write_tiny_model(&path, &TinyConfig::demo(), 1).unwrap();
    path
}

/// A copy of `src` at `dir/name` after `edit` changes its metadata and `tensor(name, type, data)` gives each
/// tensor's new type and bytes (shapes kept).
fn mutate(
    src: &Path,
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Writer),
    tensor: impl Fn(&str, GgmlType, &[u64], &[u8]) -> Option<(GgmlType, Vec<u8>)>,
) -> PathBuf {
    let f = GgufFile::open(src).unwrap();
    let mut w = Writer::new();
    for (k, v) in f.metadata().iter() {
        w.set(k, v.clone());
    }
    edit(&mut w);
    let mut data = Vec::new();
    for t in &f.header().tensors {
        let bytes = f.tensor_data(t);
        let (ty, bytes) = tensor(&t.name, t.ty, &t.dims, bytes).unwrap_or((t.ty, bytes.to_vec()));
        w.add_tensor(&t.name, &t.dims, ty).unwrap();
        data.push(bytes);
    }
    let dst = dir.join(name);
    w.write_file(&dst, true, |i, _, out| out.write_all(&data[i]))
        .unwrap();
    dst
}

/// `src` with metadata key `key` set to `value`.
fn with_key(src: &Path, dir: &Path, key: &str, value: Value) -> PathBuf {
    let file = format!("{}.gguf", key.replace('.', "_"));
    mutate(src, dir, &file, |w| w.set(key, value), |_, _, _, _| None)
}

/// `src` with tensor `target` retyped to `ty` (zero bytes of the new size).
fn with_type(src: &Path, dir: &Path, target: &str, ty: GgmlType) -> PathBuf {
    let file = format!("{target}-{}.gguf", ty.name());
    mutate(
        src,
        dir,
        &file,
        |_| {},
        |name, _, dims, _| {
            (name == target).then(|| {
                let rows: u64 = dims[1..].iter().product();
                let bytes = ty.row_bytes(dims[0]).unwrap() * rows;
                (ty, vec![0u8; bytes as usize])
            })
        },
    )
}

/// `ferrite complete` on `model` for two tokens.
fn complete(model: &Path, cache: &Path, extra: &[&str]) -> Output {
    let model = model.to_str().unwrap();
    let args = [
        &[
            "complete", "-m", model, "-t", "1", "-n", "2", "-p", "hi", "--temp", "0",
        ][..],
        extra,
    ]
    .concat();
    run(&args, cache, None)
}

/// Asserts exit code 1 (not an abort or a crash) with every `needle` on stderr.
fn refused(out: &Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {err}", out.status);
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    for needle in needles {
        assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
    }
}

/// The message `Engine::open` refuses `path` with.
fn load_error(path: &Path) -> String {
    let opened = Engine::open(
        path,
        EngineOptions {
            n_threads: 1,
            cache_type: CacheType::F32,
            ..Default::default()
        },
    );
    format!("{:#}", opened.err().expect("the model was accepted"))
}

fn assert_has(msg: &str, needles: &[&str]) {
    for needle in needles {
        assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
    }
}

// The three cases reproduced through the binary.

#[test]
fn negative_rms_epsilon_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let key = "deepseek4.attention.layer_norm_rms_epsilon";
    let model = with_key(&demo(dir.path()), dir.path(), key, Value::F32(-1.0));
    refused(
        &complete(&model, dir.path(), &[]),
        &[key, "is -1", "expected a finite number >= 0", "hint:"],
    );
}

#[test]
fn block_count_past_the_tensors_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let key = "deepseek4.block_count";
    let model = with_key(
        &demo(dir.path()),
        dir.path(),
        key,
        Value::U32(4_000_000_000),
    );
    let needles = [key, "is 4000000000", "expected at most 4", "blk.3", "hint:"];
    refused(&complete(&model, dir.path(), &[]), &needles);
    // `info` shows the file as it is, and says it does not hold that many blocks.
    let out = run(
        &["info", "--no-tensors", model.to_str().unwrap()],
        dir.path(),
        None,
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        stdout.contains("4000000000 layers (but the file has tensors for 4 blocks only"),
        "{stdout}"
    );
}

#[test]
fn expert_ids_past_expert_count_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let id = 100_000i32.to_le_bytes();
    let model = mutate(
        &demo(dir.path()),
        dir.path(),
        "tid2eid.gguf",
        |_| {},
        |name, ty, _, data| {
            name.ends_with("ffn_gate_tid2eid.weight")
                .then(|| (ty, id.repeat(data.len() / 4)))
        },
    );
    let needles = [
        "blk.0.ffn_gate_tid2eid.weight",
        "expert id 100000",
        "expected 0..8",
        "hint:",
    ];
    refused(&complete(&model, dir.path(), &[]), &needles);
    refused(&complete(&model, dir.path(), &["--no-repack"]), &needles);
}

// Tensor types the CPU backend cannot compute with for the tensor's role.

#[test]
fn matrices_without_a_cpu_dot_product_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = demo(dir.path());
    for ty in [GgmlType::Q8_1, GgmlType::Q8K, GgmlType::F64] {
        let name = "blk.0.attn_q_a.weight";
        let msg = load_error(&with_type(&src, dir.path(), name, ty));
        assert_has(
            &msg,
            &[
                name,
                &format!("has type {ty}"),
                "the CPU multiplies",
                "hint:",
            ],
        );
    }
}

/// Q8_1 was accepted as an embedding ("it has rows to read") and crashed at the first token: ggml's `get_rows`
/// dequantizes a block type's rows with its `to_float`, which Q8_1 lacks (a call through NULL, exit 139; found by
/// tests/mutants.rs, seed 0xa00296b of the model suite: "retype token_embd.weight to q8_1").
#[test]
fn embeddings_without_get_rows_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = demo(dir.path());
    let name = "token_embd.weight";
    for ty in [GgmlType::Q8K, GgmlType::F64, GgmlType::Q8_1] {
        let msg = load_error(&with_type(&src, dir.path(), name, ty));
        assert_has(
            &msg,
            &[name, &format!("has type {ty}"), "reads rows of", "hint:"],
        );
    }
    let q8_1 = with_type(&src, dir.path(), name, GgmlType::Q8_1);
    refused(
        &complete(&q8_1, dir.path(), &[]),
        &[name, "has type q8_1", "reads rows of"],
    );
    // A block type with a dequantizer is read: the model runs.
    let q8_0 = with_type(&src, dir.path(), name, GgmlType::Q8_0);
    let out = complete(&q8_0, dir.path(), &[]);
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
}

#[test]
fn norm_vectors_must_be_f32() {
    let dir = tempfile::tempdir().unwrap();
    let src = demo(dir.path());
    for (name, ty) in [
        ("blk.0.attn_norm.weight", GgmlType::F16),
        ("output_norm.weight", GgmlType::Bf16),
        ("blk.1.ffn_norm.weight", GgmlType::Q8_0),
    ] {
        let msg = load_error(&with_type(&src, dir.path(), name, ty));
        assert_has(&msg, &[name, &format!("has type {ty}, expected f32")]);
    }
}

// Hyper-parameters that size graphs and constants.

#[test]
fn sinkhorn_iterations_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let key = "deepseek4.hyper_connection.sinkhorn_iterations";
    let model = with_key(&demo(dir.path()), dir.path(), key, Value::U32(1_000_000));
    let msg = load_error(&model);
    assert_has(&msg, &[key, "is 1000000", "expected 1..=100", "hint:"]);
}

#[test]
fn indexer_key_length_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let key = "deepseek4.attention.indexer.key_length";
    let model = with_key(&demo(dir.path()), dir.path(), key, Value::U32(65536));
    let msg = load_error(&model);
    assert_has(&msg, &[key, "is 65536", "expected at most 2048", "hint:"]);
}

#[test]
fn bad_floats_are_all_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = mutate(
        &demo(dir.path()),
        dir.path(),
        "floats.gguf",
        |w| {
            w.set("deepseek4.hyper_connection.epsilon", Value::F32(f32::NAN));
            w.set("deepseek4.rope.freq_base", Value::F32(f32::INFINITY));
            w.set("deepseek4.rope.scaling.factor", Value::F32(f32::INFINITY));
            w.set("deepseek4.expert_weights_scale", Value::F32(f32::NAN));
            w.set("deepseek4.swiglu_clamp_exp", Value::F32(-3.0));
        },
        |_, _, _, _| None,
    );
    let msg = load_error(&model);
    assert_has(
        &msg,
        &[
            "5 problems",
            "deepseek4.hyper_connection.epsilon is NaN",
            "deepseek4.rope.freq_base is inf",
            "deepseek4.rope.scaling.factor is inf",
            "deepseek4.expert_weights_scale is NaN",
            "deepseek4.swiglu_clamp_exp entry 0 is -3",
        ],
    );
}

#[test]
fn counts_that_size_tables_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let src = demo(dir.path());
    let experts = with_key(
        &src,
        dir.path(),
        "deepseek4.expert_count",
        Value::U32(1 << 30),
    );
    assert_has(
        &load_error(&experts),
        &[
            "deepseek4.expert_count is 1073741824",
            "expected at most 1024",
        ],
    );
    let window = with_key(
        &src,
        dir.path(),
        "deepseek4.attention.sliding_window",
        Value::U32(4_000_000_000),
    );
    assert_has(
        &load_error(&window),
        &[
            "deepseek4.attention.sliding_window is 4000000000",
            "expected 1..=4096",
        ],
    );
    // A head count the tensors do not hold is caught before anything is sized from it.
    let heads = with_key(
        &src,
        dir.path(),
        "deepseek4.attention.head_count",
        Value::U32(1 << 30),
    );
    assert_has(&load_error(&heads), &["attn_q_b.weight", "has shape"]);
}

// Found by the mutation tests (tests/mutants.rs).

/// `rope.dimension_count = 0` passed the rope checks (0 is even and fits) and failed only when the first graph was
/// built, with ggml's view of it ("rope_ext: n_dims = 0"); it is refused at load, naming the key.
#[test]
fn zero_rope_dimensions_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let key = "deepseek4.rope.dimension_count";
    let model = with_key(&demo(dir.path()), dir.path(), key, Value::U32(0));
    let msg = load_error(&model);
    assert_has(
        &msg,
        &[key, "is 0", "expected an even number in 2..=128", "hint:"],
    );
}
