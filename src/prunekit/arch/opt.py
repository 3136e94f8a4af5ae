"""OPT: blocks in ``model.decoder.layers``.

Attention q/k/v/out_proj; the MLP is ``fc1`` / ``fc2`` directly in the block (width ``ffn_dim``). One flag,
``enable_bias``, gives every projection a bias; head_dim = hidden / heads is derived, so fewer heads cannot be
written as a stock OPT config. ``do_layer_norm_before`` False (OPT-350m) means post-norm blocks.
"""

from prunekit.arch.base import Adapter, Layout, register

OPT_LAYOUT = Layout(
    attn="self_attn", q="q_proj", k="k_proj", v="v_proj", o="out_proj",
    mlp="", mlp_in=("fc1",), mlp_out="fc2",
    attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm",
    intermediate_key="ffn_dim", head_dim_key=None,
    attn_bias_key="enable_bias", mlp_bias_key="enable_bias", pre_norm_key="do_layer_norm_before",
)

OPT = register(("opt",), Adapter(family="opt", blocks_path="model.decoder.layers", layout=OPT_LAYOUT))
