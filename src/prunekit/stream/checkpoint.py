"""A safetensors checkpoint opened lazily: headers read once, tensors read only when asked for, nothing mapped.

A model larger than RAM is pruned from here: :func:`skeleton` builds the model from its config with every
parameter on the meta device (no memory), and :meth:`Checkpoint.read` materialises the few tensors one step
needs (one decoder block, the embeddings) straight from the files. Pickle weights are never read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PruneError

# storage dtypes prunekit computes from (in fp32 on the CPU) and writes back in the same dtype
STORAGE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
DTYPE_CODES = {v: k for k, v in STORAGE_DTYPES.items()}
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n))


class Checkpoint:
    """A local Hugging Face model directory with safetensors weights, read tensor by tensor.

    ``names``: every stored tensor; ``dtype(name)``, ``shape(name)``, ``nbytes(name)`` from the headers;
    :meth:`read` returns tensors (optionally converted); :meth:`fingerprint` identifies the files cheaply
    (names, sizes, headers, first and last MiB of each)."""

    def __init__(self, path: str | Path):
        from prunekit.zoo.models import check_model_dir

        self.dir = Path(path)
        check_model_dir(self.dir)  # refuses pickle-only or broken weights, remote code, no tokenizer
        self.config = json.loads((self.dir / "config.json").read_text())
        q = self.config.get("quantization_config")
        if q:
            raise PruneError(
                f"{self.dir / 'config.json'} describes a quantized checkpoint ({q.get('quant_method', 'quantization_config')}); "
                "prunekit streams float checkpoints (float32, float16, bfloat16): give the unquantized model."
            )
        self.files = sorted(self.dir.glob("*.safetensors"))
        self._where: dict[str, Path] = {}
        self._meta: dict[str, dict] = {}
        for f in self.files:
            for k, v in read_header(f).items():
                if k == "__metadata__":
                    continue
                if k in self._where:
                    raise PruneError(f"Tensor {k} is stored twice ({self._where[k].name} and {f.name}); the checkpoint is inconsistent.")
                self._where[k] = f
                self._meta[k] = v
        for k, v in self._meta.items():
            if v["dtype"] not in STORAGE_DTYPES and k.endswith("weight"):
                raise PruneError(
                    f"Tensor {k} is stored as {v['dtype']}, a dtype prunekit cannot compute in on the CPU; give a "
                    "float32, float16 or bfloat16 checkpoint."
                )

    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def dtype(self, name: str) -> torch.dtype | None:
        return STORAGE_DTYPES.get(self._meta[name]["dtype"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name]["shape"])

    def nbytes(self, name: str) -> int:
        lo, hi = self._meta[name]["data_offsets"]
        return hi - lo

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self._meta)

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (converted to ``dtype`` when given); each file is opened only for the read."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self._where:
                raise PruneError(f"The checkpoint {self.dir} has no tensor {n}; it does not match its own config.json.")
            by_file.setdefault(self._where[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            with _open(f) as fh:
                for k in keys:
                    t = fh.get_tensor(k)
                    out[k] = t if dtype is None or t.dtype == dtype else t.to(dtype)
        return out

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for f in self.files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                h.update(fh.read(n))
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
        h.update((self.dir / "config.json").read_bytes())
        return {"files": [f.name for f in self.files], "sha256": h.hexdigest()}


def _open(path: Path):
    """A safetensors file opened for reading with ``pread`` (no memory map: the pages read never count as this
    process's memory); older safetensors releases without that backend map the file."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt")


def skeleton(ckpt: Checkpoint) -> nn.Module:
    """The model of ``ckpt``'s config with every parameter on the meta device (buffers real, e.g. rotary)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ckpt.dir, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise PruneError(f"Could not build the model of {ckpt.dir} from its config ({str(e).splitlines()[0][:160]}).") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of parameter ``name`` (a meta placeholder or a real one)."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:
        raise PruneError(f"The model built from the config has no {name}; the checkpoint does not match it.")


def to_meta(model: nn.Module, name: str) -> None:
    """Free parameter ``name``: back to a meta placeholder of the same shape."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    p = mod._parameters[attr]
    mod._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
