"""``--format compressed-tensors``: sparse weights stored compressed, in the layout of the compressed-tensors package.

Each pruned linear weight ``<layer>.weight`` is stored as the package's sparse compressors store it:

* ``sparse-bitmask`` (unstructured, any N:M but 2:4): ``<layer>.compressed`` (the non-zeros in row-major order,
  1-D), ``<layer>.bitmask`` (uint8 ``[rows, ceil(cols / 8)]``, numpy ``packbits`` little bit order, 1 = stored),
  ``<layer>.row_offsets`` (int64, where each row starts in ``compressed``), ``<layer>.shape`` (int64).
* ``sparse-24-bitmask`` (2:4): ``<layer>.compressed`` ``[rows, cols / 2]`` (the two stored values of every four),
  ``<layer>.bitmask``, ``<layer>.shape``; the two stored of every four are the two largest magnitudes.

``config.json`` gets ``quantization_config`` with ``quant_method: compressed-tensors`` and its
``sparsity_config``. The layout is that of compressed-tensors 0.14.0.1, the last release with sparse compressors:
0.15 removed them, and vLLM 0.19.1 removed sparse-compressed loading (vLLM PR #36799), so today's vLLM serves a
pruned model from the default dense safetensors (zeros stored), which is what llm-compressor 0.14 writes too.
This format is for disk size and for the older stacks that read it; :func:`decompress` (used by
``prunekit.load``) and the package's own 0.14 decompressors give back the identical dense weights.
"""

from __future__ import annotations

import numpy as np
import torch

FORMAT_VERSION = "0.14.0.1"  # the compressed-tensors release whose sparse layout this is
PARTS = ("compressed", "bitmask", "row_offsets", "shape")


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))


def _unpack(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=shape[-1], bitorder="little")
                            .reshape(shape).astype(bool))


def bitmask_compress(prefix: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = w != 0
    counts = mask.sum(dim=-1)
    return {f"{prefix}.shape": torch.tensor(list(w.shape)), f"{prefix}.compressed": w[mask],
            f"{prefix}.bitmask": _pack(mask), f"{prefix}.row_offsets": torch.cumsum(counts, 0) - counts}


def sparse24_compress(prefix: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    groups = w.reshape(-1, 4)
    mask = torch.zeros(groups.shape, dtype=torch.bool)
    mask.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    mask = mask.view(rows, cols)
    return {f"{prefix}.shape": torch.tensor([rows, cols]), f"{prefix}.compressed": w[mask].reshape(rows, cols // 2),
            f"{prefix}.bitmask": _pack(mask)}


def decompress(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense ``<layer>.weight`` for every compressed layer in ``tensors``; the other tensors as they are."""
    out = {}
    prefixes = {k[: -len(".bitmask")] for k in tensors if k.endswith(".bitmask")}
    for k, v in tensors.items():
        base, _, part = k.rpartition(".")
        if base in prefixes and part in PARTS:
            continue
        out[k] = v
    for p in prefixes:
        shape = [int(x) for x in tensors[f"{p}.shape"].tolist()]
        values = tensors[f"{p}.compressed"].flatten()
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[_unpack(tensors[f"{p}.bitmask"], shape)] = values
        out[f"{p}.weight"] = dense
    return out


class Compressor:
    """The per-tensor writer of one run: target layers' weights compressed, everything else as it is."""

    def __init__(self, recipe, target_names: set[str]):
        nm = recipe.nm
        self.format = "sparse-24-bitmask" if nm == (2, 4) else "sparse-bitmask"
        self.structure = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
        self.targets = set(target_names)
        self._fn = sparse24_compress if self.format == "sparse-24-bitmask" else bitmask_compress

    def __call__(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix in self.targets and t.dim() == 2:
            return self._fn(prefix, t)
        return {name: t}

    def config(self, report) -> dict:
        s = report.summary
        return {"quantization_config": {
            "quant_method": "compressed-tensors", "version": FORMAT_VERSION, "transform_config": {},
            "sparsity_config": {"format": self.format, "global_sparsity": float(s.get("target_sparsity", 0.0)),
                                "sparsity_structure": self.structure, "targets": sorted(self.targets),
                                "ignore": [], "registry_requires_subclass": False},
        }}


def is_sparse_compressed(config: dict) -> bool:
    q = config.get("quantization_config") or {}
    return q.get("quant_method") == "compressed-tensors" and (q.get("sparsity_config") or {}).get("format") in (
        "sparse-bitmask", "sparse-24-bitmask")


def load_compressed(path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a directory written with ``--format compressed-tensors``, weights decompressed."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    state = decompress(tensors)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        from prunekit.errors import PruneError

        raise PruneError(f"{path} does not hold the tensors its config needs ({(missing or unexpected)[0]}); it is not an intact output.")
    model.tie_weights()
    model.eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=False)
