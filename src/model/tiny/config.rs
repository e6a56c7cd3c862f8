//! [`TinyConfig`]: every shape and hyper-parameter of a tiny model, its presets and its llama.cpp checks.

use gguf::GgmlType;

use super::values::is_weight_type;
use super::{DemoVocab, TinyError, Vocabulary, WeightTypes};

/// Every shape and hyper-parameter of a tiny model. Field names follow DSV4.md's symbols.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyConfig {
    /// Main layers (`block_count`; no MTP tensors are written).
    pub n_layer: u32,
    /// Written as `nextn_predict_layers` only (like the converter); llama.cpp ignores it without MTP tensors.
    pub nextn_predict_layers: u32,
    pub n_embd: u32,
    pub n_vocab: u32,
    pub n_head: u32,
    /// K = V head dim (`key_length` = `value_length`).
    pub head_dim: u32,
    /// Rotary dims: the last `n_rot` of each head.
    pub n_rot: u32,
    pub q_lora_rank: u32,
    /// Output LoRA rank per group.
    pub o_lora_rank: u32,
    pub o_groups: u32,
    pub sliding_window: u32,
    /// One entry per layer, each 0, 4 or 128.
    pub compress_ratios: Vec<u32>,
    pub indexer_n_head: u32,
    pub indexer_head_dim: u32,
    pub indexer_top_k: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    /// Routed and shared expert FFN width.
    pub expert_ffn: u32,
    pub n_expert_shared: u32,
    pub expert_weights_scale: f32,
    /// Layers `0..hash_layer_count` route by token id (`tid2eid`).
    pub hash_layer_count: u32,
    pub swiglu_clamp: f32,
    pub rope_freq_base: f32,
    pub compress_rope_freq_base: f32,
    pub yarn_factor: f32,
    pub yarn_orig_ctx: u32,
    pub context_length: u32,
    pub rms_eps: f32,
    pub hc_eps: f32,
    pub hc_sinkhorn_iters: u32,
    pub types: WeightTypes,
    pub vocab: Vocabulary,
}

impl TinyConfig {
    /// DSV4.md section 7's verified configuration: 6 layers, ratios `[0,4,128,4,128,0]`, hidden 256, 4 heads of 128,
    /// 16 indexer heads of 64 (top-8), 8 experts top-2 of width 64, hash layers 0-1, window 16, YaRN 16 from 256.
    pub fn small() -> TinyConfig {
        TinyConfig {
            n_layer: 6,
            nextn_predict_layers: 0,
            n_embd: 256,
            n_vocab: 1024,
            n_head: 4,
            head_dim: 128,
            n_rot: 32,
            q_lora_rank: 64,
            o_lora_rank: 32,
            o_groups: 2,
            sliding_window: 16,
            compress_ratios: vec![0, 4, 128, 4, 128, 0],
            indexer_n_head: 16,
            indexer_head_dim: 64,
            indexer_top_k: 8,
            n_expert: 8,
            n_expert_used: 2,
            expert_ffn: 64,
            n_expert_shared: 1,
            expert_weights_scale: 1.5,
            hash_layer_count: 2,
            swiglu_clamp: 10.0,
            rope_freq_base: 10000.0,
            compress_rope_freq_base: 160000.0,
            yarn_factor: 16.0,
            yarn_orig_ctx: 256,
            context_length: 4096,
            rms_eps: 1e-6,
            hc_eps: 1e-6,
            hc_sinkhorn_iters: 20,
            types: WeightTypes::F32,
            vocab: Vocabulary::None,
        }
    }

    /// A second, different layout: 7 layers `[0,4,128,4,0,128,4]`, hidden 384, 8 heads of 96 (rope 32), 4 output
    /// groups, window 32, 16 experts top-4 of width 32, 3 hash layers (raw, ratio 4 and ratio 128), indexer
    /// 16 x 64 top-16, YaRN 8 from 512, `nextn_predict_layers = 1` without MTP tensors (as the converter writes it).
    pub fn alt() -> TinyConfig {
        TinyConfig {
            n_layer: 7,
            nextn_predict_layers: 1,
            n_embd: 384,
            n_vocab: 768,
            n_head: 8,
            head_dim: 96,
            n_rot: 32,
            q_lora_rank: 96,
            o_lora_rank: 48,
            o_groups: 4,
            sliding_window: 32,
            compress_ratios: vec![0, 4, 128, 4, 0, 128, 4],
            indexer_n_head: 16,
            indexer_head_dim: 64,
            indexer_top_k: 16,
            n_expert: 16,
            n_expert_used: 4,
            expert_ffn: 32,
            n_expert_shared: 1,
            expert_weights_scale: 2.5,
            hash_layer_count: 3,
            swiglu_clamp: 10.0,
            rope_freq_base: 10000.0,
            compress_rope_freq_base: 160000.0,
            yarn_factor: 8.0,
            yarn_orig_ctx: 512,
            context_length: 8192,
            rms_eps: 1e-6,
            hc_eps: 1e-6,
            hc_sinkhorn_iters: 20,
            types: WeightTypes::F32,
            vocab: Vocabulary::None,
        }
    }

    /// The `-m demo` model: small and quick (4 layers `[0,4,128,0]`), with the demo vocabulary so text goes in and out.
    pub fn demo() -> TinyConfig {
        TinyConfig {
            n_layer: 4,
            n_vocab: 512,
            compress_ratios: vec![0, 4, 128, 0],
            vocab: Vocabulary::Demo,
            ..TinyConfig::small()
        }
    }

    /// Big experts for size tests of checkpoint conversion: [`TinyConfig::small`]'s layout with hidden 1024, 256 experts
    /// (top 8) of width 1024. As an official checkpoint (FP4 experts) that is about 2.6 GB, almost all routed
    /// experts; meant for random-fill checkpoints (`testkit::tiny_hf::Fill::Fast`) or quantized GGUFs (as F32 it is
    /// ~20 GB).
    pub fn big_experts() -> TinyConfig {
        TinyConfig {
            n_embd: 1024,
            n_expert: 256,
            n_expert_used: 8,
            expert_ffn: 1024,
            ..TinyConfig::small()
        }
    }

    /// DeepSeek V4 Flash at its real widths (DSV4.md sections 1-2) with `n_layer` layers, for speed measurements at the
    /// real matrix sizes: hidden 4096, vocabulary 129280 (`tokenizer.ggml.model = "none"`), 64 heads of 512 (rope
    /// 64), q LoRA 1024, 8 output groups of rank 1024, window 128, compressors of ratio 4 and 128, indexer 64 x 128
    /// top-512, 256 routed experts top-6 and 1 shared expert, all of width 2048, YaRN 16 from 65536, context 1M.
    ///
    /// Layer schedule: layer 0 raw (ratio 0), then 4, 128, 4, 128, ... (a single layer is ratio 4: llama.cpp needs one);
    /// hash routing in the first min(3, n_layer) layers, like Flash. Weight types: Q4_K routed experts, Q8_0 for the
    /// rest (the `Q4_K_M` recipe); [`TinyConfig::with_types`] changes them. At these types a layer is about 3.8 GB
    /// (3.6 GB of routed experts) and the embedding and output 1.1 GB: two layers make 8.7 GB. Written with
    /// [`write_tiny_model`] in chunks on every core (see [`Generation`]); `examples/flash_model.rs` is the command.
    ///
    /// [`write_tiny_model`]: super::write_tiny_model
    /// [`Generation`]: super::Generation
    pub fn flash(n_layer: u32) -> TinyConfig {
        let compress_ratios = match n_layer {
            1 => vec![4],
            n => (0..n)
                .map(|il| match il {
                    0 => 0,
                    il if il % 2 == 1 => 4,
                    _ => 128,
                })
                .collect(),
        };
        TinyConfig {
            n_layer,
            nextn_predict_layers: 0,
            n_embd: 4096,
            n_vocab: 129280,
            n_head: 64,
            head_dim: 512,
            n_rot: 64,
            q_lora_rank: 1024,
            o_lora_rank: 1024,
            o_groups: 8,
            sliding_window: 128,
            compress_ratios,
            indexer_n_head: 64,
            indexer_head_dim: 128,
            indexer_top_k: 512,
            n_expert: 256,
            n_expert_used: 6,
            expert_ffn: 2048,
            n_expert_shared: 1,
            expert_weights_scale: 1.5,
            hash_layer_count: n_layer.min(3),
            swiglu_clamp: 10.0,
            rope_freq_base: 10000.0,
            compress_rope_freq_base: 160000.0,
            yarn_factor: 16.0,
            yarn_orig_ctx: 65536,
            context_length: 1 << 20,
            rms_eps: 1e-6,
            hc_eps: 1e-6,
            hc_sinkhorn_iters: 20,
            types: WeightTypes {
                dense: GgmlType::Q8_0,
                experts: GgmlType::Q4K,
                shared: GgmlType::Q8_0,
                embed: GgmlType::Q8_0,
            },
            vocab: Vocabulary::None,
        }
    }

    /// The published DeepSeek V4 Flash: [`TinyConfig::flash`] with its 43 layers and its layer schedule (DSV4.md
    /// 1.1): layers 0 and 1 raw, then 4 on even and 128 on odd layers up to 42; hash routing in layers 0-2. The
    /// MTP block is not written. About 166 GB at Q4_K experts (`TinyConfig::flash(43)` has the same tensors with
    /// the shorter benchmark schedule).
    pub fn flash_published() -> TinyConfig {
        let compress_ratios = (0..43)
            .map(|il| match il {
                0 | 1 => 0,
                il if il % 2 == 0 => 4,
                _ => 128,
            })
            .collect();
        TinyConfig {
            compress_ratios,
            ..TinyConfig::flash(43)
        }
    }

    /// The same configuration with other weight types.
    pub fn with_types(self, types: WeightTypes) -> TinyConfig {
        TinyConfig { types, ..self }
    }

    /// Checks every loader and graph constraint of llama.cpp (DSV4.md section 7) that this generator can break;
    /// reports all problems at once.
    pub fn validate(&self) -> Result<(), TinyError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, what: &str, expected: &str, got: String| {
            if !ok {
                problems.push(format!("{what}: expected {expected}, got {got}"));
            }
        };
        let (ratios, n_layer) = (&self.compress_ratios, self.n_layer);
        check(
            (1..=512).contains(&n_layer),
            "n_layer",
            "1..=512",
            n_layer.to_string(),
        );
        check(
            ratios.len() == n_layer as usize,
            "compress_ratios",
            "one entry per layer",
            format!("{ratios:?}"),
        );
        let known = ratios.iter().all(|r| [0, 4, 128].contains(r));
        check(
            known,
            "compress_ratios",
            "entries 0, 4 or 128",
            format!("{ratios:?}"),
        );
        let csa = "at least one ratio-4 layer (llama.cpp dies with SIGFPE without one)";
        check(
            ratios.contains(&4),
            "compress_ratios",
            csa,
            format!("{ratios:?}"),
        );
        let hca = "a ratio-128 layer, as head_dim == indexer_head_dim";
        let hca_ok = self.head_dim != self.indexer_head_dim || ratios.contains(&128);
        check(hca_ok, "compress_ratios", hca, format!("{ratios:?}"));
        for (name, v) in [
            ("n_embd", self.n_embd),
            ("n_vocab", self.n_vocab),
            ("n_head", self.n_head),
            ("q_lora_rank", self.q_lora_rank),
            ("o_lora_rank", self.o_lora_rank),
            ("o_groups", self.o_groups),
            ("sliding_window", self.sliding_window),
            ("indexer_n_head", self.indexer_n_head),
            ("indexer_top_k", self.indexer_top_k),
            ("n_expert_used", self.n_expert_used),
            ("expert_ffn", self.expert_ffn),
            ("n_expert_shared", self.n_expert_shared),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
            ("yarn_orig_ctx", self.yarn_orig_ctx),
            ("context_length", self.context_length),
        ] {
            check(v > 0, name, "> 0", "0".into());
        }
        let (dh, rot, idh) = (self.head_dim, self.n_rot, self.indexer_head_dim);
        let rot_ok = rot > 0 && rot % 2 == 0 && rot <= dh && (dh - rot) % 2 == 0;
        check(
            rot_ok,
            "n_rot",
            "even, > 0, <= head_dim, head_dim - n_rot even",
            format!("{rot} (head_dim {dh})"),
        );
        let idx_ok = idh % 64 == 0 && idh >= rot;
        check(
            idx_ok,
            "indexer_head_dim",
            "a multiple of 64, >= n_rot",
            format!("{idh} (n_rot {rot})"),
        );
        let groups_ok = self.o_groups > 0 && self.n_head % self.o_groups == 0;
        check(
            groups_ok,
            "o_groups",
            "a divisor of n_head",
            format!("{} (n_head {})", self.o_groups, self.n_head),
        );
        let experts_ok = self.n_expert <= 1024 && self.n_expert_used <= self.n_expert;
        let experts = format!("{} of {}", self.n_expert_used, self.n_expert);
        check(
            experts_ok,
            "n_expert_used of n_expert",
            "n_expert_used <= n_expert <= 1024",
            experts,
        );
        let hash_ok = self.hash_layer_count <= n_layer;
        check(
            hash_ok,
            "hash_layer_count",
            "<= n_layer",
            format!("{} (n_layer {n_layer})", self.hash_layer_count),
        );
        let t = self.types;
        for (family, ty) in [
            ("dense", t.dense),
            ("experts", t.experts),
            ("shared", t.shared),
            ("embed", t.embed),
        ] {
            let storable = "F32, F16, BF16 or a block type ggml can quantize to";
            check(
                is_weight_type(ty),
                &format!("types.{family}"),
                storable,
                ty.to_string(),
            );
        }
        let vocab_ok =
            self.vocab == Vocabulary::None || self.n_vocab as usize >= DemoVocab::base_len();
        let min_vocab = format!(">= {} for the demo vocabulary", DemoVocab::base_len());
        check(vocab_ok, "n_vocab", &min_vocab, self.n_vocab.to_string());
        match problems.is_empty() {
            true => Ok(()),
            false => Err(TinyError::Config(problems.join("; "))),
        }
    }
}
