//! Named quantization recipes: a ggml type per weight family, chosen by GGUF tensor name, with per-family
//! overrides and llama.cpp's fallbacks for rows a block type cannot hold.

use gguf::GgmlType;

/// Weight families a recipe assigns types to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Routed experts' gate and up projections (`ffn_gate_exps`, `ffn_up_exps`).
    ExpertsGateUp,
    /// Routed experts' down projection (`ffn_down_exps`).
    ExpertsDown,
    /// The shared expert (`*_shexp`).
    Shared,
    /// Attention, compressor, indexer and MTP projection weights.
    Attention,
    /// `output.weight` (and the MTP block's own head).
    Output,
    /// `token_embd.weight` (and the MTP block's own embedding).
    Embeddings,
    /// Kept in F32 whatever the recipe: 1-D tensors, hyper-connection mixers, APE, sinks, router weights and bias
    /// (llama.cpp's quantizer never quantizes the router `ffn_gate_inp` either).
    KeepF32,
    /// `tid2eid` expert ids: I32.
    TokenIds,
}

impl Family {
    /// The family of the GGUF tensor `name` with `n_dims` dimensions.
    pub fn of(name: &str, n_dims: usize) -> Family {
        let base = name.rsplit_once('.').map_or(name, |(b, _)| b);
        let suffix = base.rsplit('.').next().unwrap_or(base);
        if name.contains("ffn_gate_tid2eid") {
            Family::TokenIds
        } else if n_dims < 2
            || suffix.starts_with("hc_")
            || suffix.starts_with("output_hc_")
            || suffix.ends_with("_ape")
            || suffix == "attn_sinks"
            || suffix == "ffn_gate_inp"
            || suffix == "exp_probs_b"
            || name.ends_with("_norm.weight")
        {
            Family::KeepF32
        } else if suffix == "ffn_gate_exps" || suffix == "ffn_up_exps" {
            Family::ExpertsGateUp
        } else if suffix == "ffn_down_exps" {
            Family::ExpertsDown
        } else if suffix.ends_with("_shexp") {
            Family::Shared
        } else if name == "output.weight" || name.ends_with("nextn.shared_head_head.weight") {
            Family::Output
        } else if name == "token_embd.weight" || name.ends_with("nextn.embed_tokens.weight") {
            Family::Embeddings
        } else {
            Family::Attention
        }
    }
}

/// A named recipe: the type of each family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipe {
    pub name: &'static str,
    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub file_type: u32,
    pub experts_gate_up: GgmlType,
    pub experts_down: GgmlType,
    pub shared: GgmlType,
    pub attention: GgmlType,
    pub output: GgmlType,
    pub embeddings: GgmlType,
}

/// The recipes `--type` accepts, with a one-line description each.
pub const RECIPES: &[(&str, &str)] = &[
    (
        "Q4_K_M",
        "routed experts Q4_K, other weights Q8_0 (about 4.6 bits per weight for Flash)",
    ),
    ("Q8_0", "every weight Q8_0"),
    ("Q2_K", "routed experts Q2_K, other weights Q8_0"),
    (
        "IQ2_XXS",
        "routed experts IQ2_XXS (gate, up) and Q2_K (down), other weights Q8_0; wants --imatrix",
    ),
    (
        "MXFP4",
        "routed experts MXFP4 (the released FP4 experts repacked without loss), other weights Q8_0",
    ),
    ("F16", "every weight F16"),
    ("BF16", "every weight BF16"),
    ("F32", "every weight F32 (exact: the checkpoint's values)"),
];

impl Recipe {
    /// The recipe named `name` (case-insensitive).
    pub fn named(name: &str) -> Option<Recipe> {
        use GgmlType::*;
        let (name, file_type, gate_up, down, rest) = match name.to_ascii_uppercase().as_str() {
            "Q4_K_M" => ("Q4_K_M", 15, Q4K, Q4K, Q8_0),
            "Q8_0" => ("Q8_0", 7, Q8_0, Q8_0, Q8_0),
            "Q2_K" => ("Q2_K", 10, Q2K, Q2K, Q8_0),
            "IQ2_XXS" => ("IQ2_XXS", 19, Iq2Xxs, Q2K, Q8_0),
            "MXFP4" => ("MXFP4", 38, Mxfp4, Mxfp4, Q8_0),
            "F16" => ("F16", 1, F16, F16, F16),
            "BF16" => ("BF16", 32, Bf16, Bf16, Bf16),
            "F32" => ("F32", 0, F32, F32, F32),
            _ => return None,
        };
        Some(Recipe {
            name,
            file_type,
            experts_gate_up: gate_up,
            experts_down: down,
            shared: rest,
            attention: rest,
            output: rest,
            embeddings: rest,
        })
    }

    /// The type the recipe asks for (before fallbacks).
    pub fn target(&self, family: Family) -> GgmlType {
        match family {
            Family::ExpertsGateUp => self.experts_gate_up,
            Family::ExpertsDown => self.experts_down,
            Family::Shared => self.shared,
            Family::Attention => self.attention,
            Family::Output => self.output,
            Family::Embeddings => self.embeddings,
            Family::KeepF32 => GgmlType::F32,
            Family::TokenIds => GgmlType::I32,
        }
    }
}

/// llama.cpp's fallback when rows of `n_per_row` do not fill whole blocks of `ty` (llama-quant.cpp): 256-block types
/// step down to a 32-block type, and F16 when even that does not fit. `None`: `ty` fits as it is.
pub fn block_fallback(ty: GgmlType, n_per_row: u64) -> Option<GgmlType> {
    use GgmlType::*;
    if n_per_row % ty.block_size() == 0 {
        return None;
    }
    let next = match ty {
        Iq1S | Iq1M | Iq2Xxs | Iq2Xs | Iq2S | Iq3Xxs | Iq3S | Iq4Xs => Iq4Nl,
        Q2_0 | Q2K | Q3K | Tq1_0 | Tq2_0 => Q4_0,
        Q4K => Q5_0,
        Q5K => Q5_1,
        Q6K => Q8_0,
        _ => F16,
    };
    Some(if n_per_row % next.block_size() == 0 {
        next
    } else {
        F16
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_by_name() {
        let f = |n: &str, d: usize| Family::of(n, d);
        assert_eq!(f("blk.3.ffn_gate_exps.weight", 3), Family::ExpertsGateUp);
        assert_eq!(f("blk.3.ffn_up_exps.weight", 3), Family::ExpertsGateUp);
        assert_eq!(f("blk.3.ffn_down_exps.weight", 3), Family::ExpertsDown);
        assert_eq!(f("blk.3.ffn_up_shexp.weight", 2), Family::Shared);
        assert_eq!(f("blk.3.attn_q_b.weight", 2), Family::Attention);
        assert_eq!(f("blk.3.indexer.attn_q_b.weight", 2), Family::Attention);
        assert_eq!(
            f("blk.3.indexer_compressor_kv.weight", 2),
            Family::Attention
        );
        assert_eq!(f("blk.43.nextn.eh_proj.weight", 2), Family::Attention);
        assert_eq!(f("output.weight", 2), Family::Output);
        assert_eq!(f("token_embd.weight", 2), Family::Embeddings);
        assert_eq!(f("blk.0.ffn_gate_inp.weight", 2), Family::KeepF32);
        assert_eq!(f("blk.0.hc_attn_fn.weight", 2), Family::KeepF32);
        assert_eq!(f("output_hc_fn.weight", 2), Family::KeepF32);
        assert_eq!(f("blk.1.attn_compressor_ape.weight", 2), Family::KeepF32);
        assert_eq!(f("blk.1.indexer_compressor_ape.weight", 2), Family::KeepF32);
        assert_eq!(f("blk.1.attn_sinks.weight", 1), Family::KeepF32);
        assert_eq!(f("blk.5.exp_probs_b.bias", 1), Family::KeepF32);
        assert_eq!(f("blk.0.ffn_gate_tid2eid.weight", 2), Family::TokenIds);
    }

    #[test]
    fn recipes_and_fallbacks() {
        let r = Recipe::named("q4_k_m").unwrap();
        assert_eq!(r.target(Family::ExpertsDown), GgmlType::Q4K);
        assert_eq!(r.target(Family::Attention), GgmlType::Q8_0);
        assert_eq!(r.target(Family::KeepF32), GgmlType::F32);
        assert!(Recipe::named("Q5_X").is_none());
        for (name, _) in RECIPES {
            assert!(Recipe::named(name).is_some(), "{name}");
        }
        assert_eq!(block_fallback(GgmlType::Q4K, 4096), None);
        assert_eq!(block_fallback(GgmlType::Q4K, 64), Some(GgmlType::Q5_0));
        assert_eq!(block_fallback(GgmlType::Q2K, 96), Some(GgmlType::Q4_0));
        assert_eq!(block_fallback(GgmlType::Iq2Xxs, 64), Some(GgmlType::Iq4Nl));
        assert_eq!(block_fallback(GgmlType::Q6K, 48), Some(GgmlType::F16));
        assert_eq!(block_fallback(GgmlType::Q8_0, 48), Some(GgmlType::F16));
        assert_eq!(block_fallback(GgmlType::F32, 7), None);
    }
}
