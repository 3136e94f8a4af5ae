"""Disk-streamed pruning: one decoder block in memory at a time, a durable checkpoint after every block.

:class:`BlockStream` is what the one calibration engine (:func:`prunekit.calibrate.run_sequential`) calls when
the model is a meta-device skeleton: ``load(bi)`` materialises block ``bi`` in fp32 from the checkpoint,
``done(bi, hidden)`` writes its pruned tensors (in the stored dtype) as one output shard, commits the
activations that leave it and the run's state, then frees it. The work directory sits beside ``--out``
(``.<out>.resume``); ``resume`` continues from its last committed block when its fingerprint (model files,
calibration tokens, recipe, prunekit version, output format) matches, and the finished output is linked into
``--out`` atomically. Nothing half-written is ever taken for a result: every file is written to a temporary
name and renamed, and ``state.json``, written last, is the commit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.stream.checkpoint import Checkpoint, set_tensor, to_meta

STATE = "state.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _after_commit(bi: int) -> None:
    """Called after block ``bi`` is durably committed (tests inject failures here)."""


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"})
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _write_json(path: Path, obj) -> None:
    from prunekit.io import write_json

    write_json(path, obj)


class DiskList:
    """A list of activation chunks kept in files (``--offload-dir``): reading one loads it, setting one writes it."""

    def __init__(self, folder: Path, device: torch.device | None = None):
        self.dir, self.device = folder, device or torch.device("cpu")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def _path(self, i: int) -> Path:
        return self.dir / f"chunk-{i:06d}.safetensors"

    def append(self, t: torch.Tensor) -> None:
        _save({"h": t}, self._path(self._n))
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._n:
            raise IndexError(i)
        return _load(self._path(i))["h"].to(self.device)

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        _save({"h": t}, self._path(i))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


class BlockStream:
    """The skeleton ``model``'s blocks, read from ``ckpt`` one at a time.

    ``work``: the run's work directory (``None``: a read-only pass that writes nothing, e.g. the dense
    statistics of an allocation). ``targets``: per block, the target layers ``(name, module)``, whose per-layer
    rows the run reports. ``compress(name, tensor)``: the output format's per-tensor writer (None: stock
    safetensors)."""

    def __init__(self, ckpt: Checkpoint, model: nn.Module, blocks_path: str, n_blocks: int, *, work: Path | None = None,
                 targets: list[list[tuple[str, nn.Module]]] | None = None, offload_dir: Path | None = None,
                 compress=None, device: str | torch.device = "cpu", blocks: nn.ModuleList | None = None):
        self.device, self.blocks, self._buffers_moved = torch.device(device), blocks if blocks is not None else [], False
        self.ckpt, self.model, self.work = ckpt, model, None if work is None else Path(work)
        self.n, self.targets, self.compress = n_blocks, targets or [[] for _ in range(n_blocks)], compress
        self.offload_dir = None if offload_dir is None else Path(offload_dir)
        params = dict(model.named_parameters())  # tied parameters once, under their first name
        prefix = [f"{blocks_path}.{i}." for i in range(n_blocks)]
        self.block_params = [[k for k in params if k.startswith(p)] for p in prefix]
        self.block_extra = [[k for k in ckpt.names if k.startswith(p) and k not in params] for p in prefix]
        inside = {k for names in self.block_params for k in names}
        missing = [k for k in inside if k not in set(ckpt.names)]
        if missing:
            raise PruneError(
                f"The checkpoint {ckpt.dir} has no tensor {sorted(missing)[0]} that its config's model needs; "
                "streaming reads checkpoints saved by save_pretrained under the model's own parameter names."
            )
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        untied_head = None
        if out_emb is not None:
            inp = model.get_input_embeddings()
            if inp is None or out_emb.weight is not inp.weight:
                untied_head = out_emb.weight
        self.outside = [k for k, p in params.items() if k not in inside and p is not untied_head and k in set(ckpt.names)]
        self.state: dict = {}
        self.resumed_at: int | None = None
        self._stores: list[DiskList] = []

    # ---- what the engine calls ----
    def reader(self) -> BlockStream:
        """The same blocks for a pass that only reads (no writes, no checkpoints)."""
        r = BlockStream.__new__(BlockStream)
        r.__dict__.update(self.__dict__)
        r.work, r.state, r._stores = None, {}, []
        return r

    def load_outside(self) -> None:
        """The parameters outside the blocks the capture needs (embeddings; not an untied head), on ``device``,
        with the buffers outside the blocks (rotary frequencies)."""
        for k, t in self.ckpt.read(self.outside, torch.float32).items():
            set_tensor(self.model, k, t.to(self.device))
        self._move_buffers(self.device)

    def free_outside(self) -> None:
        for k in self.outside:
            to_meta(self.model, k)
        self._move_buffers(torch.device("cpu"))

    def _move_buffers(self, device) -> None:
        if torch.device(device).type == "cpu" and not self._buffers_moved:
            return
        inside = {id(b) for blk in self.blocks for b in blk.buffers()}
        for b in self.model.buffers():
            if id(b) not in inside:
                b.data = b.data.to(device)
        self._buffers_moved = torch.device(device).type != "cpu"

    def load(self, bi: int) -> None:
        for k, t in self.ckpt.read(self.block_params[bi], torch.float32).items():
            set_tensor(self.model, k, t)

    def free(self, bi: int) -> None:
        for k in self.block_params[bi]:
            to_meta(self.model, k)

    def hidden_store(self):
        if self.offload_dir is None:
            return []
        self._made = getattr(self, "_made", 0) + 1  # never reuse a live store's folder
        store = DiskList(self.offload_dir / f"prunekit-act-{os.getpid()}-{self._made}", self.device)
        self._stores.append(store)
        return store

    @property
    def first(self) -> int:
        return int(self.state.get("done", -1)) + 1

    def resume(self, inputs) -> int:
        """Restore the activations that left the last committed block; return the block to continue from."""
        first = self.first
        if first == 0 or self.work is None:
            return 0
        folder = self.work / f"act-{first - 1:05d}"
        files = sorted(folder.glob("chunk-*.safetensors"))
        if len(files) != len(inputs.hidden):
            raise PruneError(f"The resume checkpoint {self.work} holds {len(files)} activation chunks, the run has "
                             f"{len(inputs.hidden)}; it is not this run's, delete it and start again.")
        for i, f in enumerate(files):
            inputs.hidden[i] = _load(f)["h"].to(self.device)
        say(f"resuming after block {first - 1} of {self.n} (checkpoint {self.work})")
        return first

    def done(self, bi: int, hidden) -> None:
        if self.work is None:
            self.free(bi)
            return
        from prunekit.evaluate.size import layer_sparsity

        rows = layer_sparsity(self.targets[bi])
        params = {k: self.model.get_parameter(k) for k in self.block_params[bi]}
        stats = {"params": sum(p.numel() for p in params.values()), "nonzeros": sum(int((p != 0).sum()) for p in params.values())}
        del params
        tensors = {}
        for k in self.block_params[bi]:  # each fp32 weight freed as its stored-dtype copy is made
            p = self.model.get_parameter(k)
            t = p.detach().to(self.ckpt.dtype(k) or p.dtype)
            del p
            to_meta(self.model, k)
            tensors.update(self.compress(k, t) if self.compress is not None else {k: t})
        tensors.update(self.ckpt.read(self.block_extra[bi]))
        _save(tensors, self.work / "shards" / shard_name(bi, self.n + 1))
        del tensors
        if hidden is not None:
            folder = self.work / f"act-{bi:05d}"
            tmp = self.work / f".act-{bi:05d}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for i in range(len(hidden)):
                _save({"h": hidden[i]}, tmp / f"chunk-{i:06d}.safetensors")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        self.state["done"] = bi
        self.state.setdefault("rows", {}).update(rows)
        self.state.setdefault("blocks", {})[str(bi)] = stats
        _write_json(self.work / STATE, self.state)  # the commit
        for old in self.work.glob("act-*"):
            if old.name != f"act-{bi:05d}":
                shutil.rmtree(old, ignore_errors=True)
        for store in self._stores:
            if store is not hidden:
                store.remove()
        self._stores = [s for s in self._stores if s is hidden]
        self.free(bi)
        _after_commit(bi)

    # ---- the run around the engine ----
    def begin(self, fingerprint: dict, resume: bool) -> None:
        """Open the work directory: continue it (``resume`` and a matching fingerprint) or start it afresh."""
        assert self.work is not None
        state_file = self.work / STATE
        if resume and state_file.is_file():
            try:
                state = json.loads(state_file.read_text())
            except (OSError, json.JSONDecodeError):
                raise PruneError(f"The resume checkpoint {state_file} is unreadable; delete {self.work} and start again.") from None
            old = state.get("fingerprint", {})
            for part in ("model", "calibration", "recipe", "prunekit", "format"):
                if old.get(part) != fingerprint.get(part):
                    raise PruneError(
                        f"The resume checkpoint {self.work} belongs to a different run (its {part} differs); "
                        "run without --resume to start over, or give the same model, data and recipe."
                    )
            self.state = state
            self.resumed_at = self.first
            if self.first >= self.n:
                say(f"every block is already pruned in {self.work}; writing the output")
            return
        if self.work.exists():
            if state_file.is_file() or not any(self.work.iterdir()):
                say(f"starting over: removing the earlier run's checkpoint {self.work}" if state_file.is_file() else "")
                shutil.rmtree(self.work)
            else:
                raise PruneError(f"{self.work} exists and is not a prunekit checkpoint; move it away.")
        (self.work / "shards").mkdir(parents=True)
        self.state = {"fingerprint": fingerprint, "done": -1}
        _write_json(self.work / STATE, self.state)

    def save_counts(self, counts: dict[str, int] | None) -> None:
        if self.work is not None and "counts" not in self.state:
            self.state["counts"] = counts
            _write_json(self.work / STATE, self.state)

    def size_summary(self) -> dict:
        """Like :func:`prunekit.evaluate.size.size_summary`, from what was written (tied weights once)."""
        params = sum(b["params"] for b in self.state["blocks"].values())
        nonzeros = sum(b["nonzeros"] for b in self.state["blocks"].values())
        rows = self.state.get("rows", {})
        for k, t in self._outside_tensors().items():
            if t.is_floating_point():
                params += t.numel()
                nonzeros += int((t != 0).sum())
        tp = sum(r["params"] for r in rows.values())
        tz = sum(r["zeros"] for r in rows.values())
        return {"params": params, "nonzeros": nonzeros, "target_params": tp, "target_zeros": tz,
                "target_sparsity": tz / tp if tp else 0.0}

    def _outside_names(self) -> list[str]:
        inside = {k for names in self.block_params + self.block_extra for k in names}
        return [k for k in self.ckpt.names if k not in inside]

    def _outside_tensors(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_outside_cache"):
            self._outside_cache = self.ckpt.read(self._outside_names())  # as stored
        return self._outside_cache

    def finish(self, out: Path, manifest: dict, config_update: dict | None = None, overwrite: bool = False) -> Path:
        """Write the tensors outside the blocks, the index, config, tokenizer and ``prunekit.json``; link the
        shards into ``out`` atomically; then remove the work directory."""
        from prunekit.io import MANIFEST, atomic_dir, check_output, dumps, record

        out = check_output(out, overwrite)
        total = self.n + 1
        shards = self.work / "shards"
        last = shards / shard_name(self.n, total)
        outside = self._outside_tensors()
        if outside:
            _save(outside, last)
        del self._outside_cache
        weight_map, size = {}, 0
        for f in sorted(shards.glob("model-*.safetensors")):
            from prunekit.stream.checkpoint import read_header

            for k, v in read_header(f).items():
                if k != "__metadata__":
                    weight_map[k] = f.name
                    size += v["data_offsets"][1] - v["data_offsets"][0]
        with atomic_dir(out) as tmp:
            for f in shards.glob("model-*.safetensors"):
                os.link(f, tmp / f.name)  # the checkpoint keeps its files until the output is in place
            for f in self.ckpt.dir.iterdir():
                skip = f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name in (MANIFEST, "model.safetensors.index.json")
                if f.is_file() and not skip:
                    shutil.copy2(f, tmp / f.name)
            if config_update:
                cfg = json.loads((tmp / "config.json").read_text())
                cfg.update(config_update)
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
            man = dict(manifest)
            (tmp / MANIFEST).write_text(dumps(record(man.pop("kind", "llm"), man.pop("recipe", None),
                                                     metrics=man.pop("metrics", None), timings=man.pop("timings", None),
                                                     layers=man.pop("layers", None), **man)))
        shutil.rmtree(self.work, ignore_errors=True)
        for store in self._stores:
            store.remove()
        return out


def work_dir(out: str | Path) -> Path:
    """Where the run writing ``out`` keeps its checkpoint: ``.<name>.resume`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"
