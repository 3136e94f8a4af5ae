"""How a shrunk model is written down, and how it is built again.

* Stock: every block has the same sizes and its biases are what the family's config can describe. The config
  gets the new ``num_attention_heads`` / ``num_key_value_heads`` / intermediate size / ``head_dim`` /
  ``num_hidden_layers``; stock ``AutoModelForCausalLM.from_pretrained`` loads it. The test is literal: a model
  built from the candidate config (on the meta device) must have exactly the shrunk model's tensor shapes.
* prunekit: anything else (sizes that differ between layers, a removed sublayer, heads of GPT-2/OPT whose
  config derives head_dim, a bias the config cannot switch on). The config keeps the source's sizes and gains
  ``prunekit_layer_sizes`` (per block: heads, kv_heads, intermediate, biases); :func:`load_structured`
  (used by ``prunekit.load``) builds the source-sized model, shrinks each block to those sizes and loads the
  weights. Its config.json says ``"model_type": "prunekit-<family>"`` (the real one in ``prunekit_model_type``),
  so stock transformers refuses it loudly instead of filling a removed sublayer with random weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from prunekit.arch import adapter_for
from prunekit.arch.base import Adapter
from prunekit.errors import PruneError
from prunekit.linear import is_prunable
from prunekit.structure.shrink import (
    block_heads,
    block_width,
    layer_sizes,
    remove_attention,
    remove_mlp,
    set_bias,
    shrink_heads,
    shrink_mlp,
)

SIZES_KEY = "prunekit_layer_sizes"
EXPERTS_KEY = "prunekit_expert_counts"  # per block: experts kept (None: a dense block); see prunekit.structure.experts


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def stock_candidate(adapter: Adapter, model: nn.Module) -> object | None:
    """The stock config that describes the shrunk model, or None when none does."""
    from transformers import AutoModelForCausalLM

    lay = adapter.require_layout()
    sizes = layer_sizes(adapter, model)
    uniq = {(s["heads"], s["kv_heads"], s["intermediate"]) for s in sizes}
    if len(uniq) != 1:
        return None
    heads, kv, width = uniq.pop()
    if not heads or not width:
        return None
    cand = copy.deepcopy(model.config)
    hd = adapter.head_dim(model)
    cand.num_attention_heads = heads
    if hasattr(cand, "num_key_value_heads"):
        cand.num_key_value_heads = kv
    elif kv != heads:
        return None
    setattr(cand, lay.intermediate_key, width)
    if lay.head_dim_key:
        setattr(cand, lay.head_dim_key, hd)
    if hasattr(cand, SIZES_KEY):
        delattr(cand, SIZES_KEY)
    try:
        with torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(cand)
    except (ValueError, TypeError, RuntimeError):  # a config the family rejects (e.g. hidden not divisible by heads)
        return None
    return cand if _shapes(ref) == _shapes(model) else None


def why_not_stock(adapter: Adapter, model: nn.Module) -> str:
    """In words, why no stock config describes the shrunk model."""
    sizes = layer_sizes(adapter, model)
    if any(not s["heads"] for s in sizes) or any(not s["intermediate"] for s in sizes):
        return "a sublayer is removed"
    if len({(s["heads"], s["kv_heads"], s["intermediate"]) for s in sizes}) > 1:
        return "layer sizes differ"
    lay = adapter.require_layout()
    heads = sizes[0]["heads"]
    if lay.head_dim_key is None and heads != model.config.num_attention_heads:
        return f"a stock {adapter.family} config derives head_dim from the number of heads"
    return f"it has biases a stock {adapter.family} config cannot switch on"


def finalize_config(adapter: Adapter, model: nn.Module) -> str:
    """Write the shrunk sizes into ``model.config``; returns ``"stock"`` or ``"prunekit"`` (see module doc)."""
    lay = adapter.require_layout()
    cand = stock_candidate(adapter, model)
    cfg = model.config
    if cand is not None:
        keys = ["num_attention_heads", "num_key_value_heads", lay.intermediate_key, lay.head_dim_key]
        for k in keys:
            if k and hasattr(cand, k):
                setattr(cfg, k, getattr(cand, k))
        if hasattr(cfg, SIZES_KEY):
            delattr(cfg, SIZES_KEY)
        return "stock"
    setattr(cfg, SIZES_KEY, layer_sizes(adapter, model))
    return "prunekit"


def resize_block(adapter: Adapter, model: nn.Module, i: int, size: dict) -> None:
    """Shrink block ``i`` of a freshly built model to ``size`` (weights are loaded afterwards)."""
    block = adapter.blocks(model)[i]
    heads, kv = block_heads(adapter, model, block)
    want_h, want_kv = int(size["heads"]), int(size["kv_heads"])
    if want_h == 0:
        remove_attention(adapter, model, i)
    elif (want_h, want_kv) != (heads, kv):
        if want_kv > kv or want_h > heads or want_h % want_kv:
            raise PruneError(f"Layer {i} of this checkpoint has sizes {size} that its config cannot hold; the files are inconsistent.")
        per, want_per = heads // kv, want_h // want_kv
        shrink_heads(adapter, model, i, [g * per + j for g in range(want_kv) for j in range(want_per)])
    width = int(size["intermediate"])
    if width == 0:
        remove_mlp(adapter, model, i)
    elif width != block_width(adapter, block):
        shrink_mlp(adapter, model, i, range(width))
    biases = set(size.get("biases", []))
    for name, m in block.named_modules():
        if is_prunable(m):
            set_bias(m, name in biases)


def rebuild(config) -> nn.Module:
    """A model of the architecture in ``config`` with the per-block sizes of ``config.prunekit_layer_sizes`` and
    the per-block expert counts of ``config.prunekit_expert_counts`` (either may be absent)."""
    from transformers import AutoModelForCausalLM

    from prunekit.structure.experts import EXPERTS_KEY, resize_experts

    sizes = getattr(config, SIZES_KEY, None)
    counts = getattr(config, EXPERTS_KEY, None)
    for key, got in ((SIZES_KEY, sizes), (EXPERTS_KEY, counts)):
        if got is not None and len(got) != config.num_hidden_layers:
            raise PruneError(f"config.{key} lists {len(got)} layers but num_hidden_layers is {config.num_hidden_layers}.")
    model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    with torch.no_grad():
        for i, size in enumerate(sizes or []):
            resize_block(adapter, model, i, size)
        if counts is not None:
            resize_experts(model, counts)
    return model


MARK = "prunekit_model_type"


def mark_config_file(directory: str | Path) -> None:
    """After ``save_pretrained``: hide the model type from stock loaders when the config has per-layer sizes."""
    p = Path(directory) / "config.json"
    d = json.loads(p.read_text())
    if (SIZES_KEY in d or EXPERTS_KEY in d) and MARK not in d:
        d[MARK] = d["model_type"]
        d["model_type"] = f"prunekit-{d['model_type']}"
        p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def read_config(directory: str | Path):
    """The config of a structured output (its real model type restored)."""
    from transformers import AutoConfig

    d = json.loads((Path(directory) / "config.json").read_text())
    real = d.pop(MARK, None) or d["model_type"]
    d.pop("model_type", None)
    return AutoConfig.for_model(real, **d)


def load_structured(path: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a directory whose config has ``prunekit_layer_sizes``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    config = read_config(path)
    model = rebuild(config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PruneError(f"{path} has no .safetensors weights; it is not a complete prunekit output.")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise PruneError(
            f"The weights in {path} do not fit its config.{SIZES_KEY} (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the directory is inconsistent."
        )
    if tied:
        model.tie_weights()
    model = model.to(dtype).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if (path / "tokenizer_config.json").is_file() else None
    return model, tok


def is_structured_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    d = json.loads(p.read_text())
    return SIZES_KEY in d or EXPERTS_KEY in d
