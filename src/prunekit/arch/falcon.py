"""Falcon and GPT-BigCode (StarCoder): blocks in ``transformer.h``.

Falcon: fused ``query_key_value`` (multi-query), attention and MLP in parallel from one norm. GPT-BigCode:
fused ``c_attn`` with one shared key/value head (multi-query). Unstructured pruning only.
"""

from prunekit.arch.base import Adapter, register

FALCON = register(("falcon",), Adapter(family="falcon", blocks_path="transformer.h"))
GPT_BIGCODE = register(("gpt_bigcode",), Adapter(family="gpt_bigcode", blocks_path="transformer.h"))
