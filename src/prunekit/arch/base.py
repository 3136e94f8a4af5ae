"""Adapter interface, registry and the generic fallback.

An adapter answers "where are the decoder blocks?" for one model family. Families register themselves in
their own small file (llama.py, gpt2.py, opt.py). Unknown families fall back to the longest
``nn.ModuleList`` of identical blocks that contain linear layers.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from prunekit.errors import PruneError
from prunekit.linear import is_prunable


@dataclass(frozen=True)
class Layout:
    """Where one decoder block keeps the parts structured pruning couples, and how its config names their sizes.

    Paths are dotted attribute paths: ``attn``, ``mlp`` and the norms relative to the block; ``q``/``k``/``v``/
    ``qkv``/``o`` relative to the attention module; ``mlp_in``/``mlp_out`` relative to the MLP module (to the block
    itself when ``mlp`` is empty, as in OPT).
    """

    attn: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    attn_norm: str
    mlp_norm: str
    mlp: str = ""
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # one fused projection whose outputs are [q | k | v] (GPT-2's c_attn)
    intermediate_key: str = "intermediate_size"  # config field of the MLP width
    head_dim_key: str | None = "head_dim"  # None: the config derives head_dim = hidden / heads
    attn_bias_key: str | None = None  # config flag that gives every attention projection a bias
    mlp_bias_key: str | None = None  # config flag that gives every MLP projection a bias
    pre_norm_key: str | None = None  # config flag that is False for post-norm blocks (OPT's do_layer_norm_before)
    layer_index_key: str | None = None  # config flag that makes a block's math depend on its index


@dataclass(frozen=True)
class MoELayout:
    """Where a decoder block keeps its sparse mixture-of-experts (transformers 5: the experts fused as 3-D
    parameters ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], the router a raw ``weight`` [E, H]).

    ``block``: the MoE module relative to the decoder block; ``router`` / ``experts`` / ``shared``: relative to
    it (``shared``: an always-on expert that expert pruning never touches, as in Qwen2-MoE); ``count_key``: the
    config field of the expert count.
    """

    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    count_key: str = "num_experts"
    shared: str | None = None


# attributes that attention / MLP modules of the supported families cache from their config
_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks_path: str  # dotted attribute path from the *ForCausalLM model to its ModuleList of blocks
    layout: Layout | None = None  # structure of a block; None: structured pruning is not available
    moe: MoELayout | None = None  # where a block keeps its mixture of experts; None: no expert pruning

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.blocks_path.split("."):
            if not hasattr(obj, part):
                raise PruneError(
                    f"This {self.family} model has no '{self.blocks_path}'; it does not look like a standard "
                    f"{self.family} checkpoint."
                )
            obj = getattr(obj, part)
        if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
            raise PruneError(f"'{self.blocks_path}' of this model is not a non-empty list of blocks.")
        return obj

    # ---- structure (arch knowledge used by prunekit.structure) ----
    def require_layout(self, what: str = "structured pruning") -> Layout:
        if self.layout is None:
            raise PruneError(
                f"The {self.family} adapter does not know where this model keeps its attention heads and MLP channels, "
                f"so {what} is not available; it works for llama, mistral, qwen2, gpt2 and opt models."
            )
        return self.layout

    # ---- mixture of experts (used by prunekit.structure.experts)
    def moe_layers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """``[(block index, MoE module)]`` of the blocks that have one (Qwen2/3-MoE may keep dense MLPs in some);
        one sentence when the model has none."""
        lay = self.moe
        found = []
        if lay is not None:
            for i, block in enumerate(self.blocks(model)):
                if _has(block, f"{lay.block}.{lay.experts}") and _has(block, f"{lay.block}.{lay.router}"):
                    found.append((i, _get(block, lay.block)))
        if not found:
            raise PruneError(
                f"This {self.family} model has no mixture-of-experts layers, so there are no experts to prune; expert "
                "pruning works for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models."
            )
        return found

    def router(self, moe: nn.Module) -> nn.Module:
        return _get(moe, self.moe.router)

    def experts(self, moe: nn.Module) -> nn.Module:
        return _get(moe, self.moe.experts)

    def shared_expert(self, moe: nn.Module) -> nn.Module | None:
        return _get(moe, self.moe.shared) if self.moe.shared and _has(moe, self.moe.shared) else None

    def expert_count(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.moe.count_key))

    def set_expert_count(self, model: nn.Module, n: int) -> None:
        setattr(model.config, self.moe.count_key, int(n))

    def attention(self, block: nn.Module) -> nn.Module:
        return _get(block, self.require_layout().attn)

    def mlp_parent(self, block: nn.Module) -> nn.Module:
        lay = self.require_layout()
        return _get(block, lay.mlp) if lay.mlp else block

    def attn_parts(self, block: nn.Module) -> dict[str, nn.Module]:
        """The attention projections by role: ``q``, ``k``, ``v`` (or ``qkv``) and ``o``."""
        lay, attn = self.require_layout(), self.attention(block)
        roles = {r: getattr(lay, r) for r in ("q", "k", "v", "qkv", "o")}
        return {r: _get(attn, p) for r, p in roles.items() if p is not None and _has(attn, p)}

    def mlp_parts(self, block: nn.Module) -> tuple[list[nn.Module], nn.Module]:
        """``([input projections (gate, up) / fc1 / c_fc], output projection)``."""
        lay, parent = self.require_layout(), self.mlp_parent(block)
        return [_get(parent, p) for p in lay.mlp_in], _get(parent, lay.mlp_out)

    def attn_name(self, i: int, role: str) -> str:
        lay = self.require_layout()
        return f"{self.blocks_path}.{i}.{lay.attn}.{getattr(lay, role)}"

    def mlp_name(self, i: int, part: str) -> str:
        lay = self.require_layout()
        return ".".join(x for x in (self.blocks_path, str(i), lay.mlp, part) if x)

    def head_dim(self, model: nn.Module) -> int:
        cfg = model.config
        hd = getattr(cfg, "head_dim", None)
        return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads

    def pre_norm(self, model: nn.Module) -> bool:
        key = self.require_layout().pre_norm_key
        return True if key is None else bool(getattr(model.config, key, True))

    def set_attention_sizes(self, attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        """Update the sizes an attention module cached from its config (they drive its reshapes)."""
        for a in _HEAD_ATTRS:
            if isinstance(getattr(attn, a, None), int):
                setattr(attn, a, heads)
        for a in _KV_ATTRS:
            if isinstance(getattr(attn, a, None), int):
                setattr(attn, a, kv_heads)
        if isinstance(getattr(attn, "num_key_value_groups", None), int):
            attn.num_key_value_groups = heads // kv_heads
        if isinstance(getattr(attn, "split_size", None), int):  # GPT-2 splits its fused projection by this
            attn.split_size = heads * head_dim

    def set_mlp_size(self, block: nn.Module, width: int) -> None:
        mlp = self.mlp_parent(block)
        if mlp is not block and isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = width

    def replace(self, block: nn.Module, path: str, module: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        setattr(_get(block, parent) if parent else block, leaf, module)

    def set_num_layers(self, model: nn.Module, keep: list[int]) -> None:
        """Config after keeping only the blocks ``keep`` (old indices, in order)."""
        cfg = model.config
        old = cfg.num_hidden_layers
        cfg.num_hidden_layers = len(keep)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == old:
            cfg.layer_types = [types[i] for i in keep]


def _has(obj: nn.Module, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


_REGISTRY: dict[str, Adapter] = {}


def register(model_types: tuple[str, ...], adapter: Adapter) -> Adapter:
    for t in model_types:
        _REGISTRY[t] = adapter
    return adapter


def _generic(model: nn.Module) -> Adapter:
    best_name, best_len = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
            continue
        kinds = {type(b) for b in mod}
        if len(kinds) != 1:
            continue
        if not any(is_prunable(m) for m in mod[0].modules()):
            continue
        if len(mod) > best_len:
            best_name, best_len = name, len(mod)
    if best_name is None:
        raise PruneError(
            f"Found no decoder blocks in this {type(model).__name__} (no list of identical blocks holding linear "
            "layers); prunekit supports Llama, Mistral, Qwen2, GPT-2, OPT and similar decoder-only models."
        )
    return Adapter(family=f"generic ({type(model).__name__})", blocks_path=best_name)


def adapter_for(model: nn.Module) -> Adapter:
    # import the family files so they register themselves
    from prunekit.arch import falcon, gpt2, gpt_neox, llama, moe, opt  # noqa: F401

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    return _generic(model)


def target_layers(model: nn.Module, adapter: Adapter, exclude: list[str] | tuple[str, ...] = ()) -> list[list[tuple[str, nn.Module]]]:
    """Per block, the prunable linear layers as ``(full module name, module)``, minus ``exclude`` matches.

    ``exclude`` holds fnmatch patterns against full names, e.g. ``*.mlp.down_proj`` or ``model.layers.0.*``.
    """
    blocks = adapter.blocks(model)
    prefix = adapter.blocks_path
    out: list[list[tuple[str, nn.Module]]] = []
    for i, block in enumerate(blocks):
        layers = []
        for sub, mod in block.named_modules():
            if not is_prunable(mod):
                continue
            name = f"{prefix}.{i}.{sub}"
            if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
                continue
            layers.append((name, mod))
        out.append(layers)
    return out


def untargeted_weights(model: nn.Module, adapter: Adapter) -> dict[str, int]:
    """Matrices inside the blocks that no method prunes because they are not linear layers (e.g. the 3-D expert
    weights of a mixture-of-experts block): ``{name with the block index as '*': total elements}``."""
    blocks = adapter.blocks(model)
    covered = {id(m.weight) for b in blocks for m in b.modules() if is_prunable(m)}
    out: dict[str, int] = {}
    for i, block in enumerate(blocks):
        for sub, p in block.named_parameters():
            if p.dim() >= 2 and id(p) not in covered:
                key = f"{adapter.blocks_path}.*.{sub}"
                out[key] = out.get(key, 0) + p.numel()
    return out
