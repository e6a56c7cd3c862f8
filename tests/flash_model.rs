//! The Flash-width test model (`TinyConfig::flash`, `examples/flash_model.rs`) without writing its gigabytes: its
//! shapes against DSV4.md section 2, and the chunked, threaded generator against one-piece generation.

use std::collections::HashMap;
use std::path::Path;

use ferrite::model::names::{self, blk, global};
use ferrite::model::tiny::{
    tiny_model_bytes, tiny_tensors, write_tiny_model, write_tiny_model_with, Generation, Streams,
    TinyConfig, TinyError, TinyTensor, WeightTypes,
};
use gguf::GgmlType;

fn by_name(cfg: &TinyConfig) -> HashMap<String, TinyTensor> {
    tiny_tensors(cfg)
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

#[track_caller]
fn check(tensors: &HashMap<String, TinyTensor>, name: &str, dims: &[u64], ty: GgmlType) {
    let t = tensors
        .get(name)
        .unwrap_or_else(|| panic!("{name} is missing"));
    assert_eq!(t.dims, dims, "{name}");
    assert_eq!(t.ty, ty, "{name}");
}

#[test]
fn flash_preset_has_the_real_flash_shapes() {
    let cfg = TinyConfig::flash(1);
    cfg.validate().unwrap();
    assert_eq!(cfg.compress_ratios, [4], "one layer must be ratio 4");
    assert_eq!(cfg.hash_layer_count, 1);
    let (q8, q4k, f32_) = (GgmlType::Q8_0, GgmlType::Q4K, GgmlType::F32);
    let t = by_name(&cfg);
    // DSV4.md 2.1
    check(&t, global::TOKEN_EMBD, &[4096, 129280], q8);
    check(&t, global::OUTPUT, &[4096, 129280], q8);
    check(&t, global::OUTPUT_NORM, &[4096], f32_);
    check(&t, global::OUTPUT_HC_FN, &[16384, 4], f32_);
    check(&t, global::OUTPUT_HC_BASE, &[4], f32_);
    check(&t, global::OUTPUT_HC_SCALE, &[1], f32_);
    // 2.2
    let l = |suffix: &str| names::layer(0, suffix);
    check(&t, &l(blk::HC_ATTN_FN), &[16384, 24], f32_);
    check(&t, &l(blk::HC_FFN_SCALE), &[3], f32_);
    check(&t, &l(blk::ATTN_SINKS), &[64], f32_);
    check(&t, &l(blk::ATTN_Q_A), &[4096, 1024], q8);
    check(&t, &l(blk::ATTN_Q_A_NORM), &[1024], f32_);
    check(&t, &l(blk::ATTN_Q_B), &[1024, 32768], q8);
    check(&t, &l(blk::ATTN_KV), &[4096, 512], q8);
    check(&t, &l(blk::ATTN_KV_NORM), &[512], f32_);
    check(&t, &l(blk::ATTN_OUTPUT_A), &[4096, 8192], q8);
    check(&t, &l(blk::ATTN_OUTPUT_B), &[8192, 4096], q8);
    check(&t, &l(blk::FFN_GATE_INP), &[4096, 256], q8);
    check(&t, &l(blk::FFN_GATE_EXPS), &[4096, 2048, 256], q4k);
    check(&t, &l(blk::FFN_UP_EXPS), &[4096, 2048, 256], q4k);
    check(&t, &l(blk::FFN_DOWN_EXPS), &[2048, 4096, 256], q4k);
    check(&t, &l(blk::FFN_GATE_SHEXP), &[4096, 2048], q8);
    check(&t, &l(blk::FFN_UP_SHEXP), &[4096, 2048], q8);
    check(&t, &l(blk::FFN_DOWN_SHEXP), &[2048, 4096], q8);
    check(&t, &l(blk::FFN_TID2EID), &[6, 129280], GgmlType::I32);
    assert!(
        !t.contains_key(&l(blk::FFN_EXP_PROBS_B)),
        "layer 0 routes by hash"
    );
    // 2.3 (ratio 4) and 2.4
    check(&t, &l(blk::COMP_KV), &[4096, 1024], q8);
    check(&t, &l(blk::COMP_GATE), &[4096, 1024], q8);
    check(&t, &l(blk::COMP_APE), &[1024, 4], f32_);
    check(&t, &l(blk::COMP_NORM), &[512], f32_);
    check(&t, &l(blk::INDEXER_Q_B), &[1024, 8192], q8);
    check(&t, &l(blk::INDEXER_PROJ), &[4096, 64], q8);
    check(&t, &l(blk::INDEXER_COMP_KV), &[4096, 256], q8);
    check(&t, &l(blk::INDEXER_COMP_GATE), &[4096, 256], q8);
    check(&t, &l(blk::INDEXER_COMP_APE), &[256, 4], f32_);
    check(&t, &l(blk::INDEXER_COMP_NORM), &[128], f32_);
    // 2.4: 34 tensors per ratio-4 layer, 6 global.
    assert_eq!(t.len(), 6 + 34);
}

#[test]
fn flash_layer_schedule_and_hyperparameters() {
    let cfg = TinyConfig::flash(5);
    cfg.validate().unwrap();
    assert_eq!(cfg.compress_ratios, [0, 4, 128, 4, 128]);
    assert_eq!(cfg.hash_layer_count, 3);
    let t = by_name(&cfg);
    // Raw layer 0: no compressor; ratio-128 layer 2: compressor without indexer; layer 3 scores with a bias.
    assert!(!t.contains_key(&names::layer(0, blk::COMP_KV)));
    check(
        &t,
        &names::layer(2, blk::COMP_KV),
        &[4096, 512],
        GgmlType::Q8_0,
    );
    check(
        &t,
        &names::layer(2, blk::COMP_APE),
        &[512, 128],
        GgmlType::F32,
    );
    assert!(!t.contains_key(&names::layer(2, blk::INDEXER_Q_B)));
    check(
        &t,
        &names::layer(2, blk::FFN_TID2EID),
        &[6, 129280],
        GgmlType::I32,
    );
    check(
        &t,
        &names::layer(3, blk::FFN_EXP_PROBS_B),
        &[256],
        GgmlType::F32,
    );
    assert!(!t.contains_key(&names::layer(3, blk::FFN_TID2EID)));
    // 24 per raw layer, 34 per ratio-4 layer, 28 per ratio-128 layer (DSV4.md 2.4).
    assert_eq!(t.len(), 6 + 24 + 2 * 34 + 2 * 28);

    // DSV4.md section 1 (Flash's config.json).
    assert_eq!(
        (cfg.n_embd, cfg.n_vocab, cfg.n_head, cfg.head_dim, cfg.n_rot),
        (4096, 129280, 64, 512, 64)
    );
    assert_eq!(
        (
            cfg.q_lora_rank,
            cfg.o_lora_rank,
            cfg.o_groups,
            cfg.sliding_window
        ),
        (1024, 1024, 8, 128)
    );
    assert_eq!(
        (cfg.indexer_n_head, cfg.indexer_head_dim, cfg.indexer_top_k),
        (64, 128, 512)
    );
    assert_eq!(
        (
            cfg.n_expert,
            cfg.n_expert_used,
            cfg.expert_ffn,
            cfg.n_expert_shared
        ),
        (256, 6, 2048, 1)
    );
    assert_eq!((cfg.yarn_factor, cfg.yarn_orig_ctx), (16.0, 65536));
    assert_eq!(cfg.context_length, 1 << 20);
    assert_eq!(cfg.expert_weights_scale, 1.5);

    for n in [2, 3, 43] {
        let cfg = TinyConfig::flash(n);
        cfg.validate().unwrap();
        assert_eq!(cfg.compress_ratios[0], 0);
        assert!(cfg.compress_ratios.contains(&4));
        assert_eq!(cfg.hash_layer_count, n.min(3));
    }
    assert!(TinyConfig::flash(0).validate().is_err());

    // The planned file (nothing written): the tensor data plus a header, about 8.7 GB for two layers.
    let cfg = TinyConfig::flash(2);
    let data: u64 = tiny_tensors(&cfg)
        .iter()
        .map(|t| t.ty.tensor_bytes(&t.dims).unwrap())
        .sum();
    let file = tiny_model_bytes(&cfg).unwrap();
    assert!(file > data && file < data + (1 << 20), "{file} vs {data}");
    assert!((8_000_000_000..9_500_000_000).contains(&file), "{file}");
    let types = WeightTypes::all(GgmlType::Q8_0);
    assert!(tiny_model_bytes(&cfg.with_types(types)).unwrap() > file);
}

/// A small layout whose expert stacks are whole Q4_K rows: big enough to stream in many chunks.
fn mid_config() -> TinyConfig {
    TinyConfig {
        expert_ffn: 256,
        ..TinyConfig::demo()
    }
    .with_types(WeightTypes {
        dense: GgmlType::Q8_0,
        experts: GgmlType::Q4K,
        shared: GgmlType::Q5K,
        embed: GgmlType::F16,
    })
}

fn write_with(path: &Path, cfg: &TinyConfig, generation: Generation) -> Vec<u8> {
    let mut reports = 0usize;
    let model = write_tiny_model_with(path, cfg, 5, &generation, &mut |p| {
        assert!(p.bytes_done <= p.bytes_total && p.tensors_done <= p.tensors_total);
        reports += 1;
        true
    })
    .unwrap();
    assert!(reports >= model.n_tensors);
    std::fs::read(path).unwrap()
}

#[test]
fn chunked_generation_writes_the_same_bytes_as_one_piece() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mid_config();
    let one_piece = Generation {
        threads: 1,
        chunk_values: usize::MAX,
        streams: Streams::DEFAULT,
        zero_experts: false,
    };
    // Chunks of 3 rows of 256 (the expert stacks have 8192 rows) on more threads than chunks in flight need.
    let chunked = Generation {
        threads: 3,
        chunk_values: 1000,
        streams: Streams::DEFAULT,
        zero_experts: false,
    };
    let one_stream = write_with(&dir.path().join("a.gguf"), &cfg, one_piece);
    let b = write_with(&dir.path().join("b.gguf"), &cfg, chunked);
    assert!(one_stream == b, "chunked generation changed the file");
    write_tiny_model(&dir.path().join("c.gguf"), &cfg, 5).unwrap();
    assert!(one_stream == std::fs::read(dir.path().join("c.gguf")).unwrap());

    // Block streams (what Flash's 2^31-value expert stacks use) lowered to this model's sizes: blocks of 16 rows,
    // drawn in one piece vs. in parallel chunks of one block (and of a block and a half: rounded to whole blocks).
    let streams = Streams {
        block_min_values: 1 << 16,
        block_values: 1 << 12,
    };
    let blocks = write_with(
        &dir.path().join("d.gguf"),
        &cfg,
        Generation {
            streams,
            ..one_piece
        },
    );
    for chunk_values in [100, 6000] {
        let generation = Generation {
            threads: 4,
            chunk_values,
            streams,
            zero_experts: false,
        };
        let b = write_with(&dir.path().join("e.gguf"), &cfg, generation);
        assert!(
            blocks == b,
            "block streams in chunks of {chunk_values} changed the file"
        );
    }
    assert!(
        blocks != one_stream,
        "block streams must draw other values than one stream"
    );
}

#[test]
fn cancelling_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cancelled.gguf");
    let generation = Generation {
        chunk_values: 1000,
        ..Generation::default()
    };
    let mut calls = 0;
    let err = write_tiny_model_with(&path, &mid_config(), 1, &generation, &mut |_| {
        calls += 1;
        calls < 5
    })
    .unwrap_err();
    assert!(matches!(err, TinyError::Cancelled), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `--sparse-experts`: the same file as a normal one except that the routed experts' data are zeros, left as holes;
/// every other tensor has the bytes of the normal file.
#[test]
fn zero_experts_write_holes_and_keep_every_other_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mid_config();
    let normal = write_with(&dir.path().join("a.gguf"), &cfg, Generation::default());
    let sparse_path = dir.path().join("b.gguf");
    let zeros = Generation {
        zero_experts: true,
        ..Generation::default()
    };
    let sparse = write_with(&sparse_path, &cfg, zeros);
    assert_eq!(normal.len(), sparse.len());
    let (a_model, b_model) = (
        gguf::Model::open(dir.path().join("a.gguf")).unwrap(),
        gguf::Model::open(&sparse_path).unwrap(),
    );
    let mut expert_bytes = 0u64;
    for (ta, tb) in a_model.tensors().iter().zip(b_model.tensors()) {
        let name = &tb.info.name;
        assert_eq!(ta.info, tb.info);
        let data = b_model.tensor_data(tb);
        if ferrite::model::sizes::expert_tensor_layer(name).is_some() {
            expert_bytes += tb.info.n_bytes;
            assert!(data.iter().all(|&b| b == 0), "{name} is not zeros");
        } else {
            assert!(data == a_model.tensor_data(ta), "{name} changed");
        }
    }
    assert!(
        expert_bytes > (1 << 20),
        "the test config has too few expert bytes: {expert_bytes}"
    );
    use std::os::unix::fs::MetadataExt;
    let allocated = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let (a, b) = (
        allocated(&dir.path().join("a.gguf")),
        allocated(&sparse_path),
    );
    eprintln!("allocated: normal {a} bytes, sparse {b} bytes, expert data {expert_bytes} bytes");
    // Where the filesystem has holes, most of the expert bytes are not on disk.
    if a >= normal.len() as u64 {
        assert!(
            b + expert_bytes / 2 <= a,
            "the expert zeros were written: {a} vs {b}"
        );
    }
}

/// The published Flash schedule (DSV4.md 1.1).
#[test]
fn published_flash_schedule() {
    let cfg = TinyConfig::flash_published();
    cfg.validate().unwrap();
    assert_eq!(cfg.n_layer, 43);
    assert_eq!(cfg.compress_ratios.len(), 43);
    assert_eq!(&cfg.compress_ratios[..5], &[0, 0, 4, 128, 4]);
    assert_eq!(cfg.compress_ratios[41..], [128, 4]);
    assert_eq!(cfg.compress_ratios.iter().filter(|&&r| r == 4).count(), 21);
    assert_eq!(
        cfg.compress_ratios.iter().filter(|&&r| r == 128).count(),
        20
    );
    assert_eq!(cfg.hash_layer_count, 3);
}
