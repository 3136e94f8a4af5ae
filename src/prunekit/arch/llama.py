"""Llama-style decoders whose blocks sit in ``model.layers``.

Llama, Mistral and Qwen2 also carry their block layout (q/k/v/o_proj, gate/up/down_proj, grouped-query
attention with ``num_key_value_heads``), which structured pruning needs. Llama has config flags for biases
(``attention_bias`` on q/k/v/o, ``mlp_bias`` on gate/up/down); Mistral and Qwen2 fix their biases in code
(Qwen2: q/k/v yes, o no; Mistral: none).

The other families here have the same place for their blocks but blocks that differ (fused projections, QK
norms, parallel attention and MLP, mixture-of-experts, per-layer-type attention): unstructured pruning only.
Every family listed is covered by ``tests/test_engine_families.py`` (the engine gives each block exactly the
inputs the model's own forward gives it).
"""

from prunekit.arch.base import Adapter, Layout, register

_LAYOUT = {
    "attn": "self_attn", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "mlp": "mlp", "mlp_in": ("gate_proj", "up_proj"), "mlp_out": "down_proj",
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
    "intermediate_key": "intermediate_size", "head_dim_key": "head_dim",
}

LLAMA_LAYOUT = Layout(**_LAYOUT, attn_bias_key="attention_bias", mlp_bias_key="mlp_bias")
FIXED_BIAS_LAYOUT = Layout(**_LAYOUT)

LLAMA = register(("llama",), Adapter(family="llama", blocks_path="model.layers", layout=LLAMA_LAYOUT))
MISTRAL = register(("mistral",), Adapter(family="mistral", blocks_path="model.layers", layout=FIXED_BIAS_LAYOUT))
QWEN2 = register(("qwen2",), Adapter(family="qwen2", blocks_path="model.layers", layout=FIXED_BIAS_LAYOUT))

# same place for the blocks, layout not verified for structured pruning: unstructured pruning only
UNSTRUCTURED_ONLY = (
    "qwen3",  # QK-norm
    "gemma", "gemma2", "gemma3_text",  # embeddings scaled by sqrt(hidden); Gemma 2/3: soft-capping, sliding layers
    "cohere2",  # sliding / global layers, parallel attention + MLP
    "phi3",  # fused qkv_proj and gate_up_proj
    "phi",  # parallel attention + MLP
    "olmo", "olmo2",  # OLMo 2: QK-norm over all heads, norms after each sublayer
    "stablelm",
    "granite", "smollm3",
)
for _t in UNSTRUCTURED_ONLY:
    register((_t,), Adapter(family=_t, blocks_path="model.layers"))
