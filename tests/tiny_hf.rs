//! Tiny Hugging Face DeepSeek V4 checkpoints (`testkit::tiny_hf`): they read back with the checkpoint reader
//! with every official tensor name, dtype and shape (DSV4.md 2.1-2.5, listed here independently); the FP8/FP4/BF16
//! data dequantizes to exactly the values of the official-rounding GGUF (`write_tiny_model_official`), which a
//! correct converter must reproduce; config.json has every official key; the fast fill writes gigabytes in
//! seconds; the demo tokenizer.json tokenizes like ferrite's demo vocabulary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferrite::model::tiny::{write_tiny_model, TinyConfig, Vocabulary, WeightTypes};
use ferrite::tokenizer::Tokenizer;
use quantize::dequant::{fp4_blocks, fp8_blocks};
use quantize::safetensors::{Checkpoint, Dtype, INDEX_FILE};
use serde_json::Value as Json;
use testkit::tiny_hf::{
    write_tiny_checkpoint, write_tiny_model_official, CheckpointError, CheckpointOptions, Fill,
};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("tiny_hf")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn opts(shards: usize, mtp: bool, fill: Fill) -> CheckpointOptions {
    CheckpointOptions { shards, mtp, fill }
}

/// Every checkpoint tensor of `cfg` with its dtype and shape, written out from DSV4.md 2.1-2.5 (not from the
/// generator's tables).
fn official_list(cfg: &TinyConfig, mtp: bool) -> BTreeMap<String, (Dtype, Vec<u64>)> {
    use Dtype::{BF16, F32, F8E4M3, F8E8M0, I64, I8};
    let mut m = BTreeMap::new();
    let mut add = |name: String, dtype: Dtype, shape: &[u64]| {
        assert!(
            m.insert(name.clone(), (dtype, shape.to_vec())).is_none(),
            "{name}"
        );
    };
    let d = u64::from(cfg.n_embd);
    let v = u64::from(cfg.n_vocab);
    let hc_dim = 4 * d;
    let (h, dh, q) = (
        u64::from(cfg.n_head),
        u64::from(cfg.head_dim),
        u64::from(cfg.q_lora_rank),
    );
    let (g, og) = (u64::from(cfg.o_groups), u64::from(cfg.o_lora_rank));
    let (e, k, f) = (
        u64::from(cfg.n_expert),
        u64::from(cfg.n_expert_used),
        u64::from(cfg.expert_ffn),
    );
    let (ih, id) = (
        u64::from(cfg.indexer_n_head),
        u64::from(cfg.indexer_head_dim),
    );
    let b = |x: u64| x.div_ceil(128);
    add("embed.weight".into(), BF16, &[v, d]);
    add("head.weight".into(), BF16, &[v, d]);
    add("norm.weight".into(), BF16, &[d]);
    add("hc_head_fn".into(), F32, &[4, hc_dim]);
    add("hc_head_base".into(), F32, &[4]);
    add("hc_head_scale".into(), F32, &[1]);
    let n_blocks = cfg.n_layer + u32::from(mtp);
    for il in 0..n_blocks {
        let is_mtp = il == cfg.n_layer;
        let p = if is_mtp {
            "mtp.0.".to_string()
        } else {
            format!("layers.{il}.")
        };
        let mut fp8 = |name: &str, rows: u64, cols: u64| {
            add(format!("{p}{name}.weight"), F8E4M3, &[rows, cols]);
            add(format!("{p}{name}.scale"), F8E8M0, &[b(rows), b(cols)]);
        };
        fp8("attn.wq_a", q, d);
        fp8("attn.wq_b", h * dh, q);
        fp8("attn.wkv", dh, d);
        fp8("attn.wo_a", g * og, h * dh / g);
        fp8("attn.wo_b", d, g * og);
        fp8("ffn.shared_experts.w1", f, d);
        fp8("ffn.shared_experts.w3", f, d);
        fp8("ffn.shared_experts.w2", d, f);
        let ratio = if is_mtp {
            0
        } else {
            cfg.compress_ratios[il as usize]
        };
        if ratio == 4 {
            fp8("attn.indexer.wq_b", ih * id, q);
        }
        if is_mtp {
            fp8("e_proj", d, d);
            fp8("h_proj", d, d);
        }
        let mut add =
            |name: &str, dtype: Dtype, shape: &[u64]| add(format!("{p}{name}"), dtype, shape);
        add("attn_norm.weight", BF16, &[d]);
        add("ffn_norm.weight", BF16, &[d]);
        for part in ["attn", "ffn"] {
            add(&format!("hc_{part}_fn"), F32, &[24, hc_dim]);
            add(&format!("hc_{part}_base"), F32, &[24]);
            add(&format!("hc_{part}_scale"), F32, &[3]);
        }
        add("attn.attn_sink", F32, &[h]);
        add("attn.q_norm.weight", BF16, &[q]);
        add("attn.kv_norm.weight", BF16, &[dh]);
        if ratio != 0 {
            let coff = if ratio == 4 { 2 } else { 1 };
            add("attn.compressor.wkv.weight", BF16, &[coff * dh, d]);
            add("attn.compressor.wgate.weight", BF16, &[coff * dh, d]);
            add("attn.compressor.ape", F32, &[u64::from(ratio), coff * dh]);
            add("attn.compressor.norm.weight", BF16, &[dh]);
        }
        if ratio == 4 {
            add("attn.indexer.weights_proj.weight", BF16, &[ih, d]);
            add("attn.indexer.compressor.wkv.weight", BF16, &[2 * id, d]);
            add("attn.indexer.compressor.wgate.weight", BF16, &[2 * id, d]);
            add("attn.indexer.compressor.ape", F32, &[4, 2 * id]);
            add("attn.indexer.compressor.norm.weight", BF16, &[id]);
        }
        add("ffn.gate.weight", BF16, &[e, d]);
        if !is_mtp && il < cfg.hash_layer_count {
            add("ffn.gate.tid2eid", I64, &[v, k]);
        } else {
            add("ffn.gate.bias", F32, &[e]);
        }
        for x in 0..e {
            for (w, rows, cols) in [("w1", f, d), ("w3", f, d), ("w2", d, f)] {
                add(
                    &format!("ffn.experts.{x}.{w}.weight"),
                    I8,
                    &[rows, cols / 2],
                );
                add(
                    &format!("ffn.experts.{x}.{w}.scale"),
                    F8E8M0,
                    &[rows, cols / 32],
                );
            }
        }
        if is_mtp {
            add("enorm.weight", BF16, &[d]);
            add("hnorm.weight", BF16, &[d]);
            add("norm.weight", BF16, &[d]);
            add("hc_head_fn", F32, &[4, hc_dim]);
            add("hc_head_base", F32, &[4]);
            add("hc_head_scale", F32, &[1]);
        }
    }
    m
}

fn assert_listing(ckpt: &Checkpoint, want: &BTreeMap<String, (Dtype, Vec<u64>)>) {
    let got: Vec<&str> = ckpt.names().collect();
    let want_names: Vec<&str> = want.keys().map(String::as_str).collect();
    let missing: Vec<&&str> = want_names.iter().filter(|n| !got.contains(n)).collect();
    let extra: Vec<&&str> = got.iter().filter(|n| !want.contains_key(**n)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (name, (dtype, shape)) in want {
        let t = ckpt.tensor(name).unwrap();
        assert_eq!((t.dtype, t.shape), (*dtype, shape.as_slice()), "{name}");
    }
}

#[test]
fn small_checkpoint_has_the_official_names_dtypes_and_shapes() {
    let dir = scratch("small");
    let cfg = TinyConfig::small();
    let sum = write_tiny_checkpoint(&dir, &cfg, 5, &opts(3, false, Fill::Model)).unwrap();
    assert_eq!(sum.shards.len(), 3);
    assert_eq!(sum.shards[0], dir.join("model-00001-of-00003.safetensors"));
    assert_eq!(sum.index.as_deref(), Some(dir.join(INDEX_FILE).as_path()));
    assert_eq!(sum.tokenizer, None);
    assert!(!dir.join("tokenizer.json").exists());
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.len(), sum.n_tensors);
    assert_eq!(ckpt.shards().len(), 3);
    let want = official_list(&cfg, false);
    assert_listing(&ckpt, &want);
    assert!(ckpt
        .names()
        .all(|n| !n.starts_with("model.") && !n.starts_with("mtp.")));

    // A few by hand from DSV4.md with section 7's dimensions (hidden 256, 4 heads of 128, q rank 64, 2 groups of
    // 32, 8 experts of 64, top 2, 16 indexer heads of 64, vocab 1024).
    let shape = |name: &str| {
        let t = ckpt.tensor(name).unwrap();
        (t.dtype, t.shape.to_vec())
    };
    use Dtype::{BF16, F32, F8E4M3, F8E8M0, I64, I8};
    for (name, dtype, dims) in [
        ("embed.weight", BF16, vec![1024, 256]),
        ("hc_head_fn", F32, vec![4, 1024]),
        ("layers.0.hc_attn_fn", F32, vec![24, 1024]),
        ("layers.0.attn.wq_a.weight", F8E4M3, vec![64, 256]),
        ("layers.0.attn.wq_a.scale", F8E8M0, vec![1, 2]),
        ("layers.0.attn.wq_b.weight", F8E4M3, vec![512, 64]),
        ("layers.0.attn.wq_b.scale", F8E8M0, vec![4, 1]),
        ("layers.0.attn.wo_a.weight", F8E4M3, vec![64, 256]),
        ("layers.0.attn.wo_b.weight", F8E4M3, vec![256, 64]),
        ("layers.0.attn.wo_b.scale", F8E8M0, vec![2, 1]),
        ("layers.0.ffn.gate.weight", BF16, vec![8, 256]),
        ("layers.0.ffn.gate.tid2eid", I64, vec![1024, 2]),
        ("layers.2.ffn.gate.bias", F32, vec![8]),
        ("layers.0.ffn.experts.7.w1.weight", I8, vec![64, 128]),
        ("layers.0.ffn.experts.7.w1.scale", F8E8M0, vec![64, 8]),
        ("layers.0.ffn.experts.7.w2.weight", I8, vec![256, 32]),
        ("layers.0.ffn.experts.7.w2.scale", F8E8M0, vec![256, 2]),
        ("layers.1.attn.compressor.wkv.weight", BF16, vec![256, 256]),
        ("layers.1.attn.compressor.ape", F32, vec![4, 256]),
        ("layers.1.attn.indexer.wq_b.weight", F8E4M3, vec![1024, 64]),
        ("layers.1.attn.indexer.wq_b.scale", F8E8M0, vec![8, 1]),
        ("layers.1.attn.indexer.compressor.ape", F32, vec![4, 128]),
        ("layers.2.attn.compressor.wkv.weight", BF16, vec![128, 256]),
        ("layers.2.attn.compressor.ape", F32, vec![128, 128]),
    ] {
        assert_eq!(shape(name), (dtype, dims), "{name}");
    }
    for absent in [
        "layers.0.attn.compressor.wkv.weight",
        "layers.2.attn.indexer.wq_b.weight",
        "layers.2.ffn.gate.tid2eid",
        "layers.0.ffn.gate.bias",
    ] {
        assert!(ckpt.tensor(absent).is_err(), "{absent}");
    }

    // The index: total size and every tensor's shard.
    let index: Json =
        serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], sum.total_size);
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        sum.n_tensors
    );
    let data: u64 = want
        .values()
        .map(|(dt, s)| dt.size() * s.iter().product::<u64>())
        .sum();
    assert_eq!(sum.total_size, data);

    // The same seed gives the same files; another seed other data.
    let again = scratch("small-again");
    write_tiny_checkpoint(&again, &cfg, 5, &opts(3, false, Fill::Model)).unwrap();
    for name in [
        "model-00001-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "config.json",
    ] {
        assert!(
            std::fs::read(dir.join(name)).unwrap() == std::fs::read(again.join(name)).unwrap(),
            "{name}"
        );
    }
    write_tiny_checkpoint(&again, &cfg, 6, &opts(3, false, Fill::Model)).unwrap();
    assert!(
        std::fs::read(dir.join("model-00001-of-00003.safetensors")).unwrap()
            != std::fs::read(again.join("model-00001-of-00003.safetensors")).unwrap()
    );
}

#[test]
fn mtp_checkpoint_adds_the_mtp_block() {
    let dir = scratch("alt-mtp");
    let cfg = TinyConfig::alt();
    let sum = write_tiny_checkpoint(&dir, &cfg, 9, &opts(1, true, Fill::Model)).unwrap();
    assert_eq!(sum.shards, vec![dir.join("model.safetensors")]);
    assert_eq!(sum.index, None);
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_listing(&ckpt, &official_list(&cfg, true));
    let t = ckpt.tensor("mtp.0.e_proj.weight").unwrap();
    assert_eq!(
        (t.dtype, t.shape),
        (Dtype::F8E4M3, [384u64, 384].as_slice())
    );
    let t = ckpt.tensor("mtp.0.h_proj.scale").unwrap();
    assert_eq!((t.dtype, t.shape), (Dtype::F8E8M0, [3u64, 3].as_slice()));
    let config: Json =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_nextn_predict_layers"], 1);
    assert_eq!(config["num_hidden_layers"], 7);
    assert_eq!(
        config["compress_ratios"],
        serde_json::json!([0, 4, 128, 4, 0, 128, 4, 0])
    );
}

/// f32 values of a GGUF F32/I32 tensor.
fn gguf_f32(model: &gguf::Model, name: &str) -> (Vec<u64>, Vec<u32>) {
    let t = model
        .tensor(name)
        .unwrap_or_else(|| panic!("GGUF lacks {name}"));
    let bytes = model.tensor_data(t);
    let words = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.info.dims.clone(), words)
}

/// A checkpoint tensor as f32 bits (I64 ids as i32 bits), dequantized with `quantize::dequant`.
fn dequant(ckpt: &Checkpoint, name: &str) -> Vec<u32> {
    let t = ckpt.tensor(name).unwrap();
    match t.dtype {
        Dtype::F8E4M3 => {
            let s = ckpt.tensor(&name.replace(".weight", ".scale")).unwrap();
            let (rows, cols) = (t.shape[0] as usize, t.shape[1] as usize);
            fp8_blocks(t.bytes, s.bytes, rows, cols, 128)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        }
        Dtype::I8 => {
            let s = ckpt.tensor(&name.replace(".weight", ".scale")).unwrap();
            let (rows, cols) = (t.shape[0] as usize, 2 * t.shape[1] as usize);
            fp4_blocks(t.bytes, s.bytes, rows, cols)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        }
        Dtype::BF16 => t
            .bytes
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)
            .collect(),
        Dtype::F32 => t
            .bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::I64 => t
            .bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i32 as u32)
            .collect(),
        other => panic!("{name}: unexpected dtype {other}"),
    }
}

/// The GGUF tensor a correct converter makes, from the checkpoint (DSV4.md 2.7): renamed, dequantized, experts
/// stacked {in, out, E}, eh_proj = [e_proj | h_proj] along the inputs.
fn convert(ckpt: &Checkpoint, gguf_name: &str, n_layer: u32, n_expert: u32) -> Vec<u32> {
    let globals = [
        ("token_embd.weight", "embed.weight"),
        ("output_norm.weight", "norm.weight"),
        ("output.weight", "head.weight"),
        ("output_hc_fn.weight", "hc_head_fn"),
        ("output_hc_base.weight", "hc_head_base"),
        ("output_hc_scale.weight", "hc_head_scale"),
    ];
    if let Some((_, hf)) = globals.iter().find(|(g, _)| *g == gguf_name) {
        return dequant(ckpt, hf);
    }
    let rest = gguf_name.strip_prefix("blk.").unwrap();
    let (il, suffix) = rest.split_once('.').unwrap();
    let il: u32 = il.parse().unwrap();
    let p = if il < n_layer {
        format!("layers.{il}.")
    } else {
        "mtp.0.".to_string()
    };
    let experts = |w: &str| -> Vec<u32> {
        (0..n_expert)
            .flat_map(|e| dequant(ckpt, &format!("{p}ffn.experts.{e}.{w}.weight")))
            .collect()
    };
    let hf = match suffix {
        "ffn_gate_exps.weight" => return experts("w1"),
        "ffn_up_exps.weight" => return experts("w3"),
        "ffn_down_exps.weight" => return experts("w2"),
        "nextn.eh_proj.weight" => {
            let e = dequant(ckpt, &format!("{p}e_proj.weight"));
            let h = dequant(ckpt, &format!("{p}h_proj.weight"));
            let d = (e.len() as f64).sqrt() as usize;
            return (0..d)
                .flat_map(|r| {
                    e[r * d..(r + 1) * d]
                        .iter()
                        .chain(&h[r * d..(r + 1) * d])
                        .copied()
                })
                .collect();
        }
        "attn_norm.weight" => "attn_norm.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        "hc_attn_fn.weight" => "hc_attn_fn",
        "hc_attn_base.weight" => "hc_attn_base",
        "hc_attn_scale.weight" => "hc_attn_scale",
        "hc_ffn_fn.weight" => "hc_ffn_fn",
        "hc_ffn_base.weight" => "hc_ffn_base",
        "hc_ffn_scale.weight" => "hc_ffn_scale",
        "attn_sinks.weight" => "attn.attn_sink",
        "attn_q_a.weight" => "attn.wq_a.weight",
        "attn_q_a_norm.weight" => "attn.q_norm.weight",
        "attn_q_b.weight" => "attn.wq_b.weight",
        "attn_kv.weight" => "attn.wkv.weight",
        "attn_kv_a_norm.weight" => "attn.kv_norm.weight",
        "attn_output_a.weight" => "attn.wo_a.weight",
        "attn_output_b.weight" => "attn.wo_b.weight",
        "attn_compressor_kv.weight" => "attn.compressor.wkv.weight",
        "attn_compressor_gate.weight" => "attn.compressor.wgate.weight",
        "attn_compressor_ape.weight" => "attn.compressor.ape",
        "attn_compressor_norm.weight" => "attn.compressor.norm.weight",
        "indexer.attn_q_b.weight" => "attn.indexer.wq_b.weight",
        "indexer.proj.weight" => "attn.indexer.weights_proj.weight",
        "indexer_compressor_kv.weight" => "attn.indexer.compressor.wkv.weight",
        "indexer_compressor_gate.weight" => "attn.indexer.compressor.wgate.weight",
        "indexer_compressor_ape.weight" => "attn.indexer.compressor.ape",
        "indexer_compressor_norm.weight" => "attn.indexer.compressor.norm.weight",
        "ffn_gate_inp.weight" => "ffn.gate.weight",
        "ffn_gate_tid2eid.weight" => "ffn.gate.tid2eid",
        "exp_probs_b.bias" => "ffn.gate.bias",
        "ffn_gate_shexp.weight" => "ffn.shared_experts.w1.weight",
        "ffn_up_shexp.weight" => "ffn.shared_experts.w3.weight",
        "ffn_down_shexp.weight" => "ffn.shared_experts.w2.weight",
        "nextn.enorm.weight" => "enorm.weight",
        "nextn.hnorm.weight" => "hnorm.weight",
        "nextn.shared_head_norm.weight" => "norm.weight",
        other => panic!("no checkpoint name for {other}"),
    };
    dequant(ckpt, &format!("{p}{hf}"))
}

#[test]
fn checkpoint_dequantizes_to_the_official_gguf() {
    let dir = scratch("official");
    let cfg = TinyConfig::small();
    let seed = 11;
    write_tiny_checkpoint(&dir, &cfg, seed, &opts(2, true, Fill::Model)).unwrap();
    let official = dir.join("official.gguf");
    let info = write_tiny_model_official(&official, &cfg, seed, true).unwrap();
    let plain = dir.join("plain.gguf");
    write_tiny_model(&plain, &cfg, seed).unwrap();

    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = gguf::Model::open(&official).unwrap();
    let plain = gguf::Model::open(&plain).unwrap();
    let md = model.metadata();
    assert_eq!(md.u32("deepseek4.block_count").unwrap(), cfg.n_layer + 1);
    assert_eq!(md.u32("deepseek4.nextn_predict_layers").unwrap(), 1);
    assert_eq!(
        md.int_array("deepseek4.attention.compress_ratios").unwrap(),
        vec![0, 4, 128, 4, 128, 0, 0]
    );
    // Every GGUF tensor: the plain model's tensors plus block 6 and its nextn tensors.
    assert_eq!(info.n_tensors, model.tensors().len());
    let n = cfg.n_layer;
    for t in plain.tensors() {
        assert!(model.tensor(&t.info.name).is_some(), "{}", t.info.name);
    }
    for name in [
        "blk.6.attn_q_a.weight",
        "blk.6.exp_probs_b.bias",
        "blk.6.nextn.eh_proj.weight",
        "blk.6.nextn.enorm.weight",
        "blk.6.nextn.hnorm.weight",
        "blk.6.nextn.shared_head_norm.weight",
    ] {
        assert!(model.tensor(name).is_some(), "{name}");
    }
    assert!(model.tensor("blk.6.attn_compressor_kv.weight").is_none());

    // Every tensor, bit for bit: the checkpoint dequantized and rearranged = the official GGUF.
    for t in model.tensors() {
        let name = &t.info.name;
        let want_ty = if name.contains("tid2eid") {
            gguf::GgmlType::I32
        } else {
            gguf::GgmlType::F32
        };
        assert_eq!(t.info.ty, want_ty, "{name}");
        let (_, got) = gguf_f32(&model, name);
        let converted = convert(&ckpt, name, n, cfg.n_expert);
        assert_eq!(converted.len(), got.len(), "{name}");
        let bad = converted.iter().zip(&got).position(|(a, b)| a != b);
        assert!(bad.is_none(), "{name}: element {bad:?} differs");
    }

    // The named ones of the brief, spelled out: one expert of a stacked tensor, an FP8 tensor with partial tiles.
    let (dims, gate) = gguf_f32(&model, "blk.3.ffn_gate_exps.weight");
    assert_eq!(dims, vec![256, 64, 8]);
    let expert5 = dequant(&ckpt, "layers.3.ffn.experts.5.w1.weight");
    assert_eq!(&gate[5 * 256 * 64..6 * 256 * 64], expert5.as_slice());
    let (dims, q_a) = gguf_f32(&model, "blk.0.attn_q_a.weight");
    assert_eq!(dims, vec![256, 64]); // [64, 256]: one row of 128-tiles, 64 of 128 rows used
    assert_eq!(q_a, dequant(&ckpt, "layers.0.attn.wq_a.weight"));
    let (_, ids) = gguf_f32(&model, "blk.0.ffn_gate_tid2eid.weight");
    assert_eq!(ids, dequant(&ckpt, "layers.0.ffn.gate.tid2eid"));

    // The official GGUF is the plain model rounded: FP8 within 2^-4 relative of the tile's scale, BF16 within 2^-8,
    // F32 and ids identical.
    let close = |name: &str, rel: f32| {
        let (_, a) = gguf_f32(&model, name);
        let (_, b) = gguf_f32(&plain, name);
        let max = b
            .iter()
            .map(|&x| f32::from_bits(x).abs())
            .fold(0f32, f32::max);
        let mut differ = 0;
        for (x, y) in a.iter().zip(&b) {
            let (x, y) = (f32::from_bits(*x), f32::from_bits(*y));
            assert!(
                (x - y).abs() <= rel * y.abs().max(max / 64.0),
                "{name}: {x} vs {y}"
            );
            differ += usize::from(x != y);
        }
        differ
    };
    assert!(close("blk.0.attn_q_a.weight", 1.0 / 16.0) > 0);
    assert!(close("blk.1.ffn_down_shexp.weight", 1.0 / 16.0) > 0);
    assert!(close("token_embd.weight", 1.0 / 256.0) > 0);
    assert!(close("blk.2.attn_norm.weight", 1.0 / 256.0) > 0);
    assert_eq!(close("blk.2.hc_ffn_fn.weight", 0.0), 0);
    assert_eq!(close("blk.0.ffn_gate_tid2eid.weight", 0.0), 0);
}

#[test]
fn official_gguf_without_mtp_matches_the_plain_layout() {
    let dir = scratch("official-nomtp");
    let cfg = TinyConfig::alt();
    write_tiny_checkpoint(&dir, &cfg, 3, &opts(4, false, Fill::Model)).unwrap();
    let path = dir.join("official.gguf");
    write_tiny_model_official(&path, &cfg, 3, false).unwrap();
    let plain_path = dir.join("plain.gguf");
    write_tiny_model(&plain_path, &cfg, 3).unwrap();
    let (model, plain) = (
        gguf::Model::open(&path).unwrap(),
        gguf::Model::open(&plain_path).unwrap(),
    );
    // Same tensors, names, shapes and types; nextn_predict_layers 0 as in config.json.
    let shapes = |m: &gguf::Model| {
        m.tensors()
            .iter()
            .map(|t| (t.info.name.clone(), t.info.dims.clone(), t.info.ty))
            .collect::<Vec<_>>()
    };
    assert_eq!(shapes(&model), shapes(&plain));
    assert_eq!(model.metadata().u32("deepseek4.block_count").unwrap(), 7);
    assert_eq!(
        model
            .metadata()
            .u32("deepseek4.nextn_predict_layers")
            .unwrap(),
        0
    );
    let ckpt = Checkpoint::open(&dir).unwrap();
    for name in [
        "blk.4.ffn_down_exps.weight",
        "blk.6.indexer.attn_q_b.weight",
        "blk.0.attn_output_a.weight",
        "output.weight",
    ] {
        assert_eq!(
            gguf_f32(&model, name).1,
            convert(&ckpt, name, cfg.n_layer, cfg.n_expert),
            "{name}"
        );
    }
    // Quantized GGUF types work too (the values are the official ones, then quantized by ggml).
    let q = dir.join("q8.gguf");
    let types = WeightTypes::all(gguf::GgmlType::Q8_0);
    write_tiny_model_official(&q, &cfg.clone().with_types(types), 3, true).unwrap();
    let q = gguf::Model::open(&q).unwrap();
    assert_eq!(
        q.tensor("blk.7.nextn.eh_proj.weight").unwrap().info.ty,
        gguf::GgmlType::Q8_0
    );
}

#[test]
fn config_json_has_every_official_key() {
    let dir = scratch("config");
    let cfg = TinyConfig::small();
    let sum = write_tiny_checkpoint(&dir, &cfg, 1, &opts(2, false, Fill::Fast)).unwrap();
    let config: Json = serde_json::from_slice(&std::fs::read(&sum.config).unwrap()).unwrap();
    for key in [
        "architectures",
        "model_type",
        "num_hidden_layers",
        "num_nextn_predict_layers",
        "max_position_embeddings",
        "hidden_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "qk_rope_head_dim",
        "q_lora_rank",
        "o_lora_rank",
        "o_groups",
        "sliding_window",
        "compress_ratios",
        "compress_rope_theta",
        "rope_theta",
        "rope_scaling",
        "rms_norm_eps",
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "n_shared_experts",
        "routed_scaling_factor",
        "norm_topk_prob",
        "scoring_func",
        "topk_method",
        "num_hash_layers",
        "swiglu_limit",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
        "hc_mult",
        "hc_sinkhorn_iters",
        "hc_eps",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "hidden_act",
        "attention_bias",
        "torch_dtype",
        "quantization_config",
    ] {
        assert!(config.get(key).is_some(), "config.json lacks {key}");
    }
    let c = &config;
    assert_eq!(
        c["architectures"],
        serde_json::json!(["DeepseekV4ForCausalLM"])
    );
    assert_eq!(c["model_type"], "deepseek_v4");
    assert_eq!(c["num_hidden_layers"], 6);
    assert_eq!(c["num_nextn_predict_layers"], 0);
    assert_eq!(c["max_position_embeddings"], 4096);
    assert_eq!(c["hidden_size"], 256);
    assert_eq!(c["vocab_size"], 1024);
    assert_eq!(c["num_attention_heads"], 4);
    assert_eq!(c["num_key_value_heads"], 1);
    assert_eq!(c["head_dim"], 128);
    assert_eq!(c["qk_rope_head_dim"], 32);
    assert_eq!(c["q_lora_rank"], 64);
    assert_eq!(c["o_lora_rank"], 32);
    assert_eq!(c["o_groups"], 2);
    assert_eq!(c["sliding_window"], 16);
    assert_eq!(
        c["compress_ratios"],
        serde_json::json!([0, 4, 128, 4, 128, 0])
    );
    assert_eq!(c["compress_rope_theta"].as_f64(), Some(160000.0));
    assert_eq!(c["rope_theta"].as_f64(), Some(10000.0));
    let rs = &c["rope_scaling"];
    assert_eq!(rs["type"], "yarn");
    assert_eq!(rs["factor"].as_f64(), Some(16.0));
    assert_eq!(rs["original_max_position_embeddings"], 256);
    assert_eq!(rs["beta_fast"].as_f64(), Some(32.0));
    assert_eq!(rs["beta_slow"].as_f64(), Some(1.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-6));
    assert_eq!(c["n_routed_experts"], 8);
    assert_eq!(c["num_experts_per_tok"], 2);
    assert_eq!(c["moe_intermediate_size"], 64);
    assert_eq!(c["n_shared_experts"], 1);
    assert_eq!(c["routed_scaling_factor"].as_f64(), Some(1.5));
    assert_eq!(c["norm_topk_prob"], true);
    assert_eq!(c["scoring_func"], "sqrtsoftplus");
    assert_eq!(c["topk_method"], "noaux_tc");
    assert_eq!(c["num_hash_layers"], 2);
    assert_eq!(c["swiglu_limit"].as_f64(), Some(10.0));
    assert_eq!(c["index_n_heads"], 16);
    assert_eq!(c["index_head_dim"], 64);
    assert_eq!(c["index_topk"], 8);
    assert_eq!(c["hc_mult"], 4);
    assert_eq!(c["hc_sinkhorn_iters"], 20);
    assert_eq!(c["hc_eps"].as_f64(), Some(1e-6));
    assert_eq!(
        (c["bos_token_id"].clone(), c["eos_token_id"].clone()),
        (0.into(), 1.into())
    );
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["hidden_act"], "silu");
    assert_eq!(c["attention_bias"], false);
    assert_eq!(c["torch_dtype"], "bfloat16");
    let qc = &c["quantization_config"];
    assert_eq!(qc["quant_method"], "fp8");
    assert_eq!(qc["fmt"], "e4m3");
    assert_eq!(qc["weight_block_size"], serde_json::json!([128, 128]));
    assert_eq!(qc["scale_fmt"], "ue8m0");
    assert_eq!(qc["activation_scheme"], "dynamic");
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn fast_fill_writes_gigabytes_in_seconds() {
    let dir = scratch("fast");
    let cfg = TinyConfig::big_experts();
    let start = Instant::now();
    let sum = write_tiny_checkpoint(&dir, &cfg, 2, &opts(5, false, Fill::Fast)).unwrap();
    let took = start.elapsed();
    eprintln!(
        "Fill::Fast: {} tensors, {:.2} GB in {:.1} s",
        sum.n_tensors,
        sum.file_bytes as f64 / 1e9,
        took.as_secs_f64()
    );
    assert!(sum.total_size > 2_000_000_000, "{}", sum.total_size);
    assert!(sum.file_bytes > 1u64 << 31, "{}", sum.file_bytes);
    // Generous for slow CI disks; it takes a few seconds on a laptop.
    assert!(took.as_secs() < 120, "took {took:?}");
    if let Some(peak) = peak_rss() {
        assert!(
            peak < 1 << 30,
            "peak RSS {peak} bytes: the writer must stream"
        );
    }
    let on_disk: u64 = sum
        .shards
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(on_disk, sum.file_bytes);

    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_listing(&ckpt, &official_list(&cfg, false));
    // A few tensors' bytes are of their kind.
    let w = ckpt.tensor("layers.3.attn.wq_a.weight").unwrap();
    assert!(w.bytes.iter().all(|b| b & 0x7f != 0x7f), "an FP8 NaN");
    let s = ckpt.tensor("layers.3.ffn.experts.200.w2.scale").unwrap();
    assert!(s.bytes.iter().all(|b| (119..=127).contains(b)));
    let x = ckpt.tensor("layers.3.ffn.experts.200.w2.weight").unwrap();
    let v = fp4_blocks(x.bytes, s.bytes, 1024, 1024).unwrap();
    assert!(v.iter().all(|v| v.is_finite() && v.abs() <= 6.0));
    assert!(v.iter().any(|v| *v != 0.0));
    let ids = ckpt.tensor("layers.0.ffn.gate.tid2eid").unwrap();
    for row in ids.bytes.chunks_exact(8 * 8) {
        let row: Vec<i64> = row
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert!(row.iter().all(|&e| (0..256).contains(&e)));
        let mut sorted = row.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), row.len(), "ids of a row must be distinct");
    }
    let bf = ckpt.tensor("layers.3.ffn.gate.weight").unwrap();
    assert!(bf.bytes.chunks_exact(2).all(|c| {
        let v = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
        v.is_finite() && v.abs() < 1.0
    }));
    drop(ckpt);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_tokenizer_json_tokenizes_like_ferrite() {
    let dir = scratch("demo");
    let cfg = TinyConfig::demo();
    let sum = write_tiny_checkpoint(&dir, &cfg, 4, &opts(1, false, Fill::Fast)).unwrap();
    let [tok_path, tok_cfg_path] = sum.tokenizer.clone().unwrap();
    assert_eq!(tok_path, dir.join("tokenizer.json"));
    let hf = tokenizers::Tokenizer::from_file(&tok_path).unwrap();
    let gguf_path = dir.join("demo.gguf");
    write_tiny_model(&gguf_path, &cfg, 4).unwrap();
    let ours = Tokenizer::from_gguf(&gguf::Model::open(&gguf_path).unwrap()).unwrap();

    assert_eq!(hf.get_vocab_size(true), cfg.n_vocab as usize);
    for id in 0..cfg.n_vocab {
        let text = ours.token_text(id).unwrap();
        assert_eq!(hf.token_to_id(text), Some(id), "{text:?}");
    }
    for s in [
        "Hello world, the cat is in the house.",
        "where is the 12345 and 67?\n\n  indented\tline",
        "Ünïcödé text, 日本語のテキスト and emoji 🦀!",
        "<｜begin▁of▁sentence｜><｜User｜>Hi there<｜Assistant｜><think>\nhmm</think>ok<｜end▁of▁sentence｜>",
        "  spaces   and\r\nnewlines\n",
        "",
    ] {
        let want = ours.encode(s, true);
        let got = hf.encode(s, false).unwrap();
        assert_eq!(got.get_ids(), want.as_slice(), "{s:?}");
        assert_eq!(hf.decode(&want, false).unwrap(), s, "{s:?}");
    }

    let tc: Json = serde_json::from_slice(&std::fs::read(tok_cfg_path).unwrap()).unwrap();
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["bos_token"]["content"], "<｜begin▁of▁sentence｜>");
    assert_eq!(tc["eos_token"]["content"], "<｜end▁of▁sentence｜>");
    let tj: Json = serde_json::from_slice(&std::fs::read(&tok_path).unwrap()).unwrap();
    assert_eq!(tj["model"]["type"], "BPE");
    assert_eq!(tj["pre_tokenizer"]["pretokenizers"][3]["type"], "ByteLevel");
    assert_eq!(tj["decoder"]["type"], "ByteLevel");
    let added = tj["added_tokens"].as_array().unwrap();
    assert_eq!(added[0]["special"], true);
    assert_eq!(added[0]["id"], 0);
}

#[test]
fn bad_options_and_configs_are_errors() {
    let dir = scratch("bad");
    let cfg = TinyConfig::small();
    assert!(matches!(
        write_tiny_checkpoint(&dir, &cfg, 1, &opts(0, false, Fill::Fast)),
        Err(CheckpointError::Options(_))
    ));
    assert!(matches!(
        write_tiny_checkpoint(&dir, &cfg, 1, &opts(100_000, false, Fill::Fast)),
        Err(CheckpointError::Options(_))
    ));
    let odd = TinyConfig {
        expert_ffn: 48,
        ..TinyConfig::small()
    };
    let err = write_tiny_checkpoint(&dir, &odd, 1, &opts(2, false, Fill::Model)).unwrap_err();
    assert!(err.to_string().contains("expert_ffn"), "{err}");
    assert!(write_tiny_model_official(&dir.join("x.gguf"), &odd, 1, false).is_err());
    let broken = TinyConfig {
        compress_ratios: vec![0, 0, 0, 0, 0, 0],
        ..TinyConfig::small()
    };
    assert!(matches!(
        write_tiny_checkpoint(&dir, &broken, 1, &opts(2, false, Fill::Model)),
        Err(CheckpointError::Config(_))
    ));
    // A file where the folder should be.
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(write_tiny_checkpoint(&file, &cfg, 1, &opts(2, false, Fill::Fast)).is_err());
    // Nothing was written by the refused calls.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1);
    let _ = Vocabulary::None;
}
