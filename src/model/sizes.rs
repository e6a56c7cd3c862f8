//! What a DeepSeek V4 file holds by kind of weight: routed experts (paged on demand) and everything else
//! (always resident). The expert cache and the planner are sized from these numbers.

use gguf::Model;

pub use super::names::ARCH;

/// The three stacked routed-expert tensors of a layer, `{in, out, n_expert}`.
pub const EXPERT_TENSORS: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];

/// Routed experts of one layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerExperts {
    pub layer: u32,
    pub n_expert: u64,
    /// Bytes of one expert (gate + up + down) in this layer.
    pub bytes_per_expert: u64,
}

/// Parameters and bytes, split into routed experts and the rest.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WeightSizes {
    pub params_total: u64,
    pub params_routed: u64,
    pub bytes_total: u64,
    pub bytes_routed: u64,
    /// Bytes of the token embedding table (only one row per token is read).
    pub bytes_embedding: u64,
    pub layers: Vec<LayerExperts>,
}

impl WeightSizes {
    pub fn params_other(&self) -> u64 {
        self.params_total - self.params_routed
    }

    pub fn bytes_other(&self) -> u64 {
        self.bytes_total - self.bytes_routed
    }

    /// Bytes of weights a decoded token reads when `n_used` experts per layer are active:
    /// all non-expert weights except the embedding table, one embedding row, and `n_used` experts per layer.
    pub fn active_bytes_per_token(&self, n_used: u64, embedding_rows: u64) -> u64 {
        let experts: u64 = self
            .layers
            .iter()
            .map(|l| n_used.min(l.n_expert) * l.bytes_per_expert)
            .sum();
        let embd_row = self
            .bytes_embedding
            .checked_div(embedding_rows)
            .unwrap_or(0);
        self.bytes_other() - self.bytes_embedding + embd_row + experts
    }
}

/// The layer index of a routed-expert tensor name (`blk.N.ffn_gate_exps.weight`), if it is one.
pub fn expert_tensor_layer(name: &str) -> Option<u32> {
    let (layer, kind) = block_of(name)?;
    let kind = kind.strip_suffix(".weight")?;
    EXPERT_TENSORS
        .contains(&kind)
        .then(|| u32::try_from(layer).ok())?
}

/// The block `N` of a `blk.N.REST` tensor name and its `REST`.
pub fn block_of(name: &str) -> Option<(u64, &str)> {
    let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    Some((layer.parse().ok()?, rest))
}

/// Blocks the file has tensors for: one past the highest `N` of a `blk.N.*` tensor (0 when there are none). A
/// `block_count` above this names layers that cannot be there, so it bounds every per-layer table.
pub fn blocks_with_tensors(model: &Model) -> u64 {
    model
        .tensors()
        .iter()
        .filter_map(|t| block_of(&t.info.name)?.0.checked_add(1))
        .max()
        .unwrap_or(0)
}

/// One tensor as the sizes are computed from it: a file's tensor table, or a generator's (the tiny and
/// Flash-shaped models of [`crate::model::tiny`], whose sizes tests plan without writing them).
#[derive(Clone, Copy, Debug)]
pub struct TensorMeta<'a> {
    pub name: &'a str,
    /// ggml order (`ne0` first).
    pub dims: &'a [u64],
    pub n_bytes: u64,
}

/// Sizes of the weights of `model`, by kind, from its tensor table.
pub fn weight_sizes(model: &Model) -> WeightSizes {
    weight_sizes_of(model.tensors().iter().map(|t| TensorMeta {
        name: &t.info.name,
        dims: &t.info.dims,
        n_bytes: t.info.n_bytes,
    }))
}

/// [`weight_sizes`] of any list of tensors.
pub fn weight_sizes_of<'a>(tensors: impl IntoIterator<Item = TensorMeta<'a>>) -> WeightSizes {
    let mut sizes = WeightSizes {
        params_total: 0,
        params_routed: 0,
        bytes_total: 0,
        bytes_routed: 0,
        bytes_embedding: 0,
        layers: Vec::new(),
    };
    for info in tensors {
        let n_elements = info.dims.iter().product::<u64>();
        sizes.params_total += n_elements;
        sizes.bytes_total += info.n_bytes;
        if info.name == "token_embd.weight" {
            sizes.bytes_embedding = info.n_bytes;
        }
        let Some(layer) = expert_tensor_layer(info.name) else {
            continue;
        };
        sizes.params_routed += n_elements;
        sizes.bytes_routed += info.n_bytes;
        let n_expert = info.dims.get(2).copied().unwrap_or(1).max(1);
        let per_expert = info.n_bytes / n_expert;
        match sizes.layers.iter_mut().find(|l| l.layer == layer) {
            Some(l) => l.bytes_per_expert += per_expert,
            None => sizes.layers.push(LayerExperts {
                layer,
                n_expert,
                bytes_per_expert: per_expert,
            }),
        }
    }
    sizes.layers.sort_by_key(|l| l.layer);
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_names() {
        assert_eq!(expert_tensor_layer("blk.12.ffn_down_exps.weight"), Some(12));
        assert_eq!(expert_tensor_layer("blk.0.ffn_gate_exps.weight"), Some(0));
        assert_eq!(expert_tensor_layer("blk.0.ffn_gate_shexp.weight"), None);
        assert_eq!(expert_tensor_layer("blk.x.ffn_up_exps.weight"), None);
        assert_eq!(expert_tensor_layer("token_embd.weight"), None);
    }
}
