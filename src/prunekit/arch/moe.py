"""Mixture-of-experts decoders (blocks in ``model.layers``): where each block keeps its router and its fused
experts, for expert pruning and merging (:mod:`prunekit.structure.experts`).

Their attention and dense parts are not laid out for head / channel pruning (Qwen3-MoE and OLMoE have QK norms,
the MLP is a mixture): no ``layout``, so heads / MLP / hidden structured pruning refuses them with one sentence;
unstructured methods prune their linear layers and leave the 3-D expert weights dense.
"""

from prunekit.arch.base import Adapter, MoELayout, register

MIXTRAL = register(("mixtral",), Adapter(family="mixtral", blocks_path="model.layers",
                                         moe=MoELayout(count_key="num_local_experts")))
OLMOE = register(("olmoe",), Adapter(family="olmoe", blocks_path="model.layers", moe=MoELayout()))
QWEN2_MOE = register(("qwen2_moe",), Adapter(family="qwen2_moe", blocks_path="model.layers",
                                             moe=MoELayout(shared="shared_expert")))
QWEN3_MOE = register(("qwen3_moe",), Adapter(family="qwen3_moe", blocks_path="model.layers", moe=MoELayout()))
