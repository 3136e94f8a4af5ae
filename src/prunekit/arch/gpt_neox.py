"""GPT-NeoX (Pythia): blocks in ``gpt_neox.layers``; fused ``query_key_value``, parallel attention + MLP.

Unstructured pruning only (no structured layout).
"""

from prunekit.arch.base import Adapter, register

GPT_NEOX = register(("gpt_neox",), Adapter(family="gpt_neox", blocks_path="gpt_neox.layers"))
