"""GPT-2: blocks in ``transformer.h``; its linear layers are ``Conv1D`` (weights stored as [in, out]).

Attention is one fused ``c_attn`` whose outputs are [q | k | v]; the MLP is ``mlp.c_fc`` / ``mlp.c_proj``
(width ``n_inner``). The config derives head_dim = n_embd / n_head, so fewer heads cannot be written as a
stock GPT-2 config.
"""

from prunekit.arch.base import Adapter, Layout, register

GPT2_LAYOUT = Layout(
    attn="attn", qkv="c_attn", o="c_proj",
    mlp="mlp", mlp_in=("c_fc",), mlp_out="c_proj",
    attn_norm="ln_1", mlp_norm="ln_2",
    intermediate_key="n_inner", head_dim_key=None,
    layer_index_key="scale_attn_by_inverse_layer_idx",
)

GPT2 = register(("gpt2",), Adapter(family="gpt2", blocks_path="transformer.h", layout=GPT2_LAYOUT))
