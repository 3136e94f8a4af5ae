"""Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...): blocks in ``model.layers``.

Llama, Mistral and Qwen2 also carry their block layout (q/k/v/o_proj, gate/up/down_proj, grouped-query
attention with ``num_key_value_heads``), which structured pruning needs. Llama has config flags for biases
(``attention_bias`` on q/k/v/o, ``mlp_bias`` on gate/up/down); Mistral and Qwen2 fix their biases in code
(Qwen2: q/k/v yes, o no; Mistral: none).
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
# same blocks, layout not verified here: unstructured pruning only
LLAMA_LIKE = register(
    ("qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite", "smollm3"),
    Adapter(family="llama", blocks_path="model.layers"),
)
