#!/usr/bin/env python3
"""Writes the Hugging Face transformers fixture of tests/hf_transformers.rs (see tests/fixtures/hf_tiny/README.md).

A tiny DeepseekV4ForCausalLM (transformers 5.23.0, float32, eager attention) with seeded random weights runs on a
fixed token sequence; the logits of every position and the same weights as a llama.cpp `deepseek4` GGUF are
written as small fixtures, so the Rust test needs neither torch nor transformers.

    python tests/py/hf_fixture.py [OUT_DIR]        (default tests/fixtures/hf_tiny)

Needs: transformers==5.23.0, torch (CPU is enough), gguf==0.19.0, numpy. Not part of scripts/requirements.txt:
run it from a throwaway virtual environment (the README gives the exact commands).

Outputs in OUT_DIR:
    model.gguf    every tensor F32 (tid2eid I32), metadata as DSV4.md section 1 with llama.cpp's exact types
    tokens.json   {"tokens": [...]} the token ids fed (positions 0..n-1, one sequence)
    logits.npy    float32 [n_tokens, n_vocab], row-major: transformers' logits of every position

Everything is deterministic: weights and tokens come from NumPy's PCG64 with fixed seeds, not from torch's RNG.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

SEED = 20260523
TOKEN_SEED = 4242
N_TOKENS = 300

# The tiny configuration. Layer 0 raw window + hash routing, layer 1 ratio 4 (CSA, indexer) + hash routing,
# layer 2 ratio 128 (HCA) + score routing with bias. 300 tokens: the raw window (16) slides, the indexer chooses
# 4 of up to 75 compressed rows (16 heads, so exact-zero score ties are rare: DSV4.md 3.8), and positions >= 127
# see the ratio-128 row. YaRN 16 from 256 ramps over rope pairs 0-5 of 16. head_dim 96 differs from the indexer
# head dim 64, so llama.cpp does not Hadamard-rotate the main caches.
CFG = dict(
    n_layer=3,
    ratios=[0, 4, 128],
    n_hash=2,
    n_vocab=256,
    n_embd=32,
    n_head=2,
    head_dim=96,
    n_rot=32,
    q_lora=16,
    o_groups=2,
    o_lora=16,
    window=16,
    idx_heads=16,
    idx_dim=64,
    idx_topk=4,
    n_expert=4,
    n_expert_used=2,
    expert_ffn=16,
    routed_scale=1.5,
    swiglu_limit=10.0,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    yarn_factor=16.0,
    yarn_orig_ctx=256,
    rms_eps=1e-6,
    hc_eps=1e-6,
    hc_iters=20,
)
HC = 4
# Expert gate/up pre-activations ~ N(0, 8^2) on RMS-normalised inputs, so the SwiGLU clamp at 10 bites often;
# the down projections shrink the clamped product back to O(1) (the same scales as src/model/tiny.rs).
EXPERT_PREACT_STD = 8.0
EXPERT_DOWN_GAIN = 1.0 / 32.0


def hf_config():
    from transformers import DeepseekV4Config

    c = CFG
    layer_type = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    return DeepseekV4Config(
        vocab_size=c["n_vocab"],
        hidden_size=c["n_embd"],
        moe_intermediate_size=c["expert_ffn"],
        num_hidden_layers=c["n_layer"],
        num_attention_heads=c["n_head"],
        num_key_value_heads=1,
        head_dim=c["head_dim"],
        q_lora_rank=c["q_lora"],
        num_experts_per_tok=c["n_expert_used"],
        n_routed_experts=c["n_expert"],
        n_shared_experts=1,
        scoring_func="sqrtsoftplus",
        norm_topk_prob=True,
        routed_scaling_factor=c["routed_scale"],
        max_position_embeddings=int(c["yarn_orig_ctx"] * c["yarn_factor"]),
        rope_theta=c["rope_theta"],
        compress_rope_theta=c["compress_rope_theta"],
        layer_types=[layer_type[r] for r in c["ratios"]],
        mlp_layer_types=["hash_moe" if i < c["n_hash"] else "moe" for i in range(c["n_layer"])],
        partial_rotary_factor=c["n_rot"] / c["head_dim"],
        rope_parameters={
            "rope_type": "yarn",
            "factor": c["yarn_factor"],
            "original_max_position_embeddings": c["yarn_orig_ctx"],
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
        hc_mult=HC,
        hc_sinkhorn_iters=c["hc_iters"],
        hc_eps=c["hc_eps"],
        swiglu_limit=c["swiglu_limit"],
        sliding_window=c["window"],
        o_groups=c["o_groups"],
        o_lora_rank=c["o_lora"],
        index_n_heads=c["idx_heads"],
        index_head_dim=c["idx_dim"],
        index_topk=c["idx_topk"],
        num_nextn_predict_layers=0,
        rms_norm_eps=c["rms_eps"],
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def init_value(name, shape, rng):
    """Seeded values for one HF parameter, chosen by its name (same scales as src/model/tiny.rs)."""
    c = CFG
    d, ff = c["n_embd"], c["expert_ffn"]
    normal = lambda std: (std * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("tid2eid"):
        n_tok, k = shape
        return np.stack([rng.permutation(c["n_expert"])[:k] for _ in range(n_tok)]).astype(np.int64)
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    if name.endswith(("hc.fn", "hc_head.hc_fn")):
        return normal(1.0 / np.sqrt(HC * d))
    if name.endswith(("hc.base", "hc_head.hc_base", "sinks")):
        return normal(1.0)
    if name.endswith(("hc.scale", "hc_head.hc_scale")):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("position_bias"):
        return normal(0.5)
    if name.endswith("e_score_correction_bias"):
        return normal(0.1)
    if name.endswith(("norm.weight", "layernorm.weight")):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("experts.gate_up_proj") or name.endswith(("shared_experts.gate_proj.weight",
                                                               "shared_experts.up_proj.weight")):
        return normal(EXPERT_PREACT_STD / np.sqrt(d))
    if name.endswith(("experts.down_proj", "shared_experts.down_proj.weight")):
        return normal(EXPERT_DOWN_GAIN / np.sqrt(ff))
    if name.endswith(".weight") and len(shape) == 2:
        return normal(1.0 / np.sqrt(shape[1]))  # Linear [out, in]: outputs keep the input scale
    raise ValueError(f"no init rule for {name} {shape}")


def build_model():
    import torch
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(SEED)
    model = DeepseekV4ForCausalLM(hf_config()).to(torch.float32).eval()
    rng = np.random.default_rng(SEED)
    state = model.state_dict()
    new_state = {}
    for name in sorted(state):
        t = state[name]
        if "rotary_emb" in name:
            continue
        new_state[name] = torch.from_numpy(init_value(name, tuple(t.shape), rng)).to(t.dtype)
    missing, unexpected = model.load_state_dict(new_state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary_emb" in m for m in missing), missing
    return model


def gguf_tensors(sd):
    """HF state dict (NumPy) -> [(GGUF name, array)] in llama.cpp's deepseek4 layout (DSV4.md section 2).

    A PyTorch [out, in] weight is byte-identical to the GGUF tensor {in, out}; gguf.GGUFWriter reverses the NumPy
    shape itself. Expert stacks [E, out, in] become {in, out, E}; HF packs gate and up as gate_up_proj
    [E, 2F, D] = concat(w1, w3) (conversion_mapping.py), so the first F rows are the gate.
    """
    c = CFG
    f = c["expert_ffn"]
    out = []

    def put(gguf_name, hf_name, arr=None):
        a = sd[hf_name] if arr is None else arr
        out.append((gguf_name, np.ascontiguousarray(a)))

    put("token_embd.weight", "model.embed_tokens.weight")
    put("output_norm.weight", "model.norm.weight")
    put("output.weight", "lm_head.weight")
    put("output_hc_fn.weight", "model.hc_head.hc_fn")
    put("output_hc_base.weight", "model.hc_head.hc_base")
    put("output_hc_scale.weight", "model.hc_head.hc_scale")
    for il in range(c["n_layer"]):
        p = f"model.layers.{il}."
        b = f"blk.{il}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight")
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        for hc, g in (("attn_hc", "hc_attn"), ("ffn_hc", "hc_ffn")):
            put(b + g + "_fn.weight", p + hc + ".fn")
            put(b + g + "_base.weight", p + hc + ".base")
            put(b + g + "_scale.weight", p + hc + ".scale")
        a = p + "self_attn."
        put(b + "attn_sinks.weight", a + "sinks")
        put(b + "attn_q_a.weight", a + "q_a_proj.weight")
        put(b + "attn_q_a_norm.weight", a + "q_a_norm.weight")
        put(b + "attn_q_b.weight", a + "q_b_proj.weight")
        put(b + "attn_kv.weight", a + "kv_proj.weight")
        put(b + "attn_kv_a_norm.weight", a + "kv_norm.weight")
        put(b + "attn_output_a.weight", a + "o_a_proj.weight")
        put(b + "attn_output_b.weight", a + "o_b_proj.weight")
        ratio = c["ratios"][il]
        if ratio != 0:
            cp = a + "compressor."
            put(b + "attn_compressor_kv.weight", cp + "kv_proj.weight")
            put(b + "attn_compressor_gate.weight", cp + "gate_proj.weight")
            put(b + "attn_compressor_ape.weight", cp + "position_bias")
            put(b + "attn_compressor_norm.weight", cp + "kv_norm.weight")
        if ratio == 4:
            ix = a + "compressor.indexer."
            put(b + "indexer.attn_q_b.weight", ix + "q_b_proj.weight")
            put(b + "indexer.proj.weight", ix + "scorer.weights_proj.weight")
            put(b + "indexer_compressor_kv.weight", ix + "kv_proj.weight")
            put(b + "indexer_compressor_gate.weight", ix + "gate_proj.weight")
            put(b + "indexer_compressor_ape.weight", ix + "position_bias")
            put(b + "indexer_compressor_norm.weight", ix + "kv_norm.weight")
        m = p + "mlp."
        put(b + "ffn_gate_inp.weight", m + "gate.weight")
        if il < c["n_hash"]:
            tid2eid = sd[m + "gate.tid2eid"]
            assert tid2eid.min() >= 0 and tid2eid.max() < c["n_expert"]
            put(b + "ffn_gate_tid2eid.weight", None, tid2eid.astype(np.int32))  # int64 -> I32, {K, n_vocab}
        else:
            put(b + "exp_probs_b.bias", m + "gate.e_score_correction_bias")
        gate_up = sd[m + "experts.gate_up_proj"]
        put(b + "ffn_gate_exps.weight", None, gate_up[:, :f, :])
        put(b + "ffn_up_exps.weight", None, gate_up[:, f:, :])
        put(b + "ffn_down_exps.weight", m + "experts.down_proj")
        put(b + "ffn_gate_shexp.weight", m + "shared_experts.gate_proj.weight")
        put(b + "ffn_up_shexp.weight", m + "shared_experts.up_proj.weight")
        put(b + "ffn_down_shexp.weight", m + "shared_experts.down_proj.weight")
    return out


def write_gguf(path, tensors):
    """Metadata of DSV4.md section 1 with the exact GGUF types llama.cpp's type-strict getters need."""
    import gguf

    c = CFG
    w = gguf.GGUFWriter(str(path), "deepseek4")
    a = "deepseek4."
    w.add_string("general.name", "ferrite hf_tiny (transformers DeepseekV4ForCausalLM)")
    w.add_uint32(a + "block_count", c["n_layer"])
    w.add_uint32(a + "nextn_predict_layers", 0)
    w.add_uint32(a + "context_length", int(c["yarn_orig_ctx"] * c["yarn_factor"]))
    w.add_uint32(a + "embedding_length", c["n_embd"])
    w.add_uint32(a + "vocab_size", c["n_vocab"])
    w.add_uint32(a + "attention.head_count", c["n_head"])
    w.add_uint32(a + "attention.head_count_kv", 1)
    w.add_uint32(a + "attention.key_length", c["head_dim"])
    w.add_uint32(a + "attention.value_length", c["head_dim"])
    w.add_uint32(a + "rope.dimension_count", c["n_rot"])
    w.add_uint32(a + "attention.q_lora_rank", c["q_lora"])
    w.add_uint32(a + "attention.output_lora_rank", c["o_lora"])
    w.add_uint32(a + "attention.output_group_count", c["o_groups"])
    w.add_uint32(a + "attention.sliding_window", c["window"])
    w.add_array(a + "attention.compress_ratios", [int(r) for r in c["ratios"]])  # INT32 elements
    w.add_float32(a + "attention.compress_rope_freq_base", c["compress_rope_theta"])
    w.add_float32(a + "rope.freq_base", c["rope_theta"])
    w.add_string(a + "rope.scaling.type", "yarn")
    w.add_float32(a + "rope.scaling.factor", c["yarn_factor"])
    w.add_uint32(a + "rope.scaling.original_context_length", c["yarn_orig_ctx"])
    w.add_float32(a + "rope.scaling.yarn_beta_fast", 32.0)
    w.add_float32(a + "rope.scaling.yarn_beta_slow", 1.0)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", c["rms_eps"])
    w.add_uint32(a + "expert_count", c["n_expert"])
    w.add_uint32(a + "expert_used_count", c["n_expert_used"])
    w.add_uint32(a + "expert_feed_forward_length", c["expert_ffn"])
    w.add_uint32(a + "expert_shared_count", 1)
    w.add_float32(a + "expert_weights_scale", c["routed_scale"])
    w.add_bool(a + "expert_weights_norm", True)
    w.add_uint32(a + "expert_gating_func", 4)  # sqrt(softplus)
    w.add_uint32(a + "hash_layer_count", c["n_hash"])
    w.add_array(a + "swiglu_clamp_exp", [float(c["swiglu_limit"])] * c["n_layer"])  # FLOAT32 elements
    w.add_uint32(a + "attention.indexer.head_count", c["idx_heads"])
    w.add_uint32(a + "attention.indexer.key_length", c["idx_dim"])
    w.add_uint32(a + "attention.indexer.top_k", c["idx_topk"])
    w.add_uint32(a + "hyper_connection.count", HC)
    w.add_uint32(a + "hyper_connection.sinkhorn_iterations", c["hc_iters"])
    w.add_float32(a + "hyper_connection.epsilon", c["hc_eps"])
    w.add_string("tokenizer.ggml.model", "none")
    for name, arr in tensors:
        assert arr.dtype in (np.float32, np.int32), (name, arr.dtype)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_npy(path, arr):
    arr = np.ascontiguousarray(arr, dtype="<f4")
    np.save(path, arr, allow_pickle=False)


def main():
    import torch
    import transformers

    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf_tiny")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    model = build_model()
    rng = np.random.default_rng(TOKEN_SEED)
    tokens = rng.integers(0, CFG["n_vocab"], N_TOKENS).astype(np.int64)
    with torch.no_grad():
        ids = torch.from_numpy(tokens).unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits[0].float().numpy()
    assert logits.shape == (N_TOKENS, CFG["n_vocab"]) and np.isfinite(logits).all()

    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    tensors = gguf_tensors(sd)
    n_params = sum(v.size for v in sd.values())
    assert sum(a.size for _, a in tensors) == n_params, "every HF parameter goes to the GGUF exactly once"

    write_gguf(out_dir / "model.gguf", tensors)
    (out_dir / "tokens.json").write_text(json.dumps({"tokens": [int(t) for t in tokens]}) + "\n")
    write_npy(out_dir / "logits.npy", logits)

    sizes = {p.name: os.path.getsize(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"{len(tensors)} tensors, {n_params} parameters; logits {logits.shape}, max |logit| "
          f"{np.abs(logits).max():.3f}")
    for name, size in sizes.items():
        print(f"  {out_dir / name}: {size} bytes")


if __name__ == "__main__":
    main()
