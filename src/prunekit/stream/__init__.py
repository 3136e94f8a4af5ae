"""Pruning at real size: a checkpoint streamed from disk block by block, resumable, exportable for serving.

``prune_checkpoint(path, out, recipe)`` is :func:`prunekit.prune` for a model that need not fit in memory: the
same engine, methods and allocator (bit-identical selections), with the model a meta-device skeleton whose
blocks are read, pruned and written one at a time (:mod:`prunekit.stream.engine`). Peak memory: about one
block in fp32 twice, the calibration activations (or none, with ``offload_dir``), and the embeddings while the
first block's inputs are captured.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import torch

from prunekit.errors import PruneError
from prunekit.stream.checkpoint import Checkpoint, skeleton
from prunekit.stream.engine import BlockStream, work_dir

FORMATS = ("safetensors", "compressed-tensors")

__all__ = ["FORMATS", "BlockStream", "Checkpoint", "check_scores_fit", "prune_checkpoint", "work_dir"]


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_scores_fit(n_weights: int, kind: str) -> None:
    """Global / LAMP allocation ranks every weight's score at once; refuse when those fp32 scores cannot fit."""
    need = n_weights * 4 * 3  # the scores, their concatenation, the ranking
    if need > _available_memory():
        raise PruneError(
            f"Allocation {kind} ranks all {n_weights:,} weights at once ({need / 2**30:.1f} GiB) and that does not fit "
            "in this machine's free memory; use --allocation owl or uniform, which stream block by block."
        )


def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _check_space(ckpt: Checkpoint, out: Path, offload_dir: Path | None, act_bytes: int, fmt: str, density: float) -> None:
    """Refuse before any work when the output (+ its checkpoint of activations) or the offloaded activations
    cannot fit on their disks."""
    weights = ckpt.total_bytes()
    if fmt == "compressed-tensors":  # values kept + one bit per weight (an upper bound: dense tensors stay dense)
        weights = int(weights * min(1.0, density + 1 / 16)) + (1 << 20)
    need_out = weights + 2 * act_bytes + (64 << 20)
    if offload_dir is not None and _same_disk(offload_dir, out.parent):
        need_out += 2 * act_bytes
    free = _free_bytes(out.parent)
    if free < need_out:
        raise PruneError(f"The output needs about {need_out / 2**30:.2f} GiB on the disk of {out.parent} and only "
                         f"{free / 2**30:.2f} GiB is free; free space or choose another --out.")
    if offload_dir is not None and not _same_disk(offload_dir, out.parent):
        free = _free_bytes(offload_dir)
        if free < 2 * act_bytes:
            raise PruneError(f"The offloaded activations need about {2 * act_bytes / 2**30:.2f} GiB on the disk of "
                             f"{offload_dir} and only {free / 2**30:.2f} GiB is free; choose another --offload-dir.")


def _same_disk(a: Path, b: Path) -> bool:
    def dev(p):
        while not p.exists():
            p = p.parent
        return p.stat().st_dev

    return dev(Path(a)) == dev(Path(b))


def _refuse(recipe) -> None:
    if recipe.structure is not None:
        raise PruneError("Structured pruning is not streamed yet (it plans over all blocks at once); drop --stream, "
                         "or prune unstructured / N:M.")
    if recipe.experts is not None:
        raise PruneError("Expert pruning is not streamed yet; drop --stream (the model is pruned in memory).")
    if recipe.recovery is not None:
        raise PruneError("Recovery trains the whole model at once, which is not streamed; prune with --stream first, "
                         "then run prunekit recover on the output.")
    if recipe.method in ("gblm", "d-pruner"):
        raise PruneError(f"{recipe.method.upper() if recipe.method == 'gblm' else 'D-Pruner'} needs the gradients of the whole model at once, which is not streamed; use "
                         "wanda or sparsegpt with --stream.")
    if recipe.allocation.kind == "rd" and not recipe.allocation.table:
        raise PruneError("Allocation rd measures every unit of the whole model in memory; with --stream give the table "
                         "of prunekit sensitivity --measure distortion (--sensitivity-table).")


def fingerprint(ckpt: Checkpoint, batches: torch.Tensor | None, recipe, fmt: str) -> dict:
    from prunekit import __version__
    from prunekit.io import dumps

    cal = "none" if batches is None else hashlib.sha256(batches.to(torch.int64).contiguous().numpy().tobytes()
                                                        + str(tuple(batches.shape)).encode()).hexdigest()
    return {"model": ckpt.fingerprint(), "calibration": cal,
            "recipe": hashlib.sha256(dumps(recipe.model_dump(), indent=None).encode()).hexdigest(),
            "prunekit": __version__, "format": fmt}


def prune_checkpoint(path: str | Path, out: str | Path, recipe=None, calibration_batches: torch.Tensor | None = None, *,
                     tokenizer=None, resume: bool = False, offload_dir: str | Path | None = None,
                     format: str = "safetensors", overwrite: bool = False, device: str = "cpu", progress: bool = True,
                     manifest: dict | None = None):
    """Prune the safetensors checkpoint at ``path`` as ``recipe`` says, streaming it block by block, and write
    the result to ``out`` (stock ``from_pretrained`` loads it; stored dtype kept). Returns the :class:`Report`.

    ``resume``: continue the run whose checkpoint sits beside ``out`` (``.<out>.resume``) when it is this run's;
    without it an earlier checkpoint is started over. ``offload_dir``: keep the calibration activations in files
    there instead of memory. ``format``: ``safetensors`` (dense, zeros stored) or ``compressed-tensors`` (bitmask
    / 2:4 sparse weights, :mod:`prunekit.stream.export`). ``manifest``: extra fields for ``prunekit.json``.
    """
    from prunekit import api
    from prunekit.arch import adapter_for, target_layers
    from prunekit.checks import check_device
    from prunekit.io import check_output
    from prunekit.recipe import Recipe

    t_start = time.perf_counter()
    if recipe is None:
        recipe = Recipe()
    elif isinstance(recipe, dict):
        recipe = Recipe.make(**recipe)
    if format not in FORMATS:
        raise PruneError(f"Unknown --format {format!r}; choose one of {', '.join(FORMATS)}.")
    _refuse(recipe)
    check_device(device)
    out = check_output(out, overwrite, inputs=[path])
    from prunekit.zoo.models import resolve_model

    where = Path(resolve_model(str(path)))
    if not where.is_dir():
        raise PruneError(f"--stream reads a local model directory; {path} is not one (download it first).")
    ckpt = Checkpoint(where)
    model = skeleton(ckpt)
    from prunekit.checks import check_seqlen

    check_seqlen(model, recipe.calibration.seqlen)
    adapter = adapter_for(model)
    per_block = target_layers(model, adapter, recipe.exclude)
    flat = api._check_targets(per_block, recipe)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    cal = recipe.calibration
    if recipe.needs_data and calibration_batches is None:
        calibration_batches = api._windows_from_text(tokenizer, cal.text or "shakespeare", cal.samples, cal.seqlen,
                                                     cal.seed, cal.bos)
    recipe = api._record_bos(model, recipe, calibration_batches,
                             getattr(tokenizer, "bos_token_id", None) if calibration_batches is not None else None)
    recipe = api.resolve_chunks(model, recipe, calibration_batches, device)
    compress = None
    if format == "compressed-tensors":
        from prunekit.stream.export import Compressor

        compress = Compressor(recipe, {n for n, _ in flat})
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    act = 0 if calibration_batches is None else calibration_batches.numel() * hidden * 4
    off = None if offload_dir is None else Path(offload_dir)
    if off is not None and off.exists() and not off.is_dir():
        raise PruneError(f"--offload-dir {off} is a file; give a directory for the offloaded activations.")
    _check_space(ckpt, out, off, act, format, 1.0 - recipe.sparsity)
    if off is not None:
        off.mkdir(parents=True, exist_ok=True)
    blocks = adapter.blocks(model)
    stream = BlockStream(ckpt, model, adapter.blocks_path, len(blocks), work=work_dir(out), targets=per_block,
                         offload_dir=off, compress=compress, device=device, blocks=blocks)
    stream.begin(fingerprint(ckpt, calibration_batches, recipe, format), resume)
    with torch.no_grad():
        _, report = api._prune_only(model, recipe, calibration_batches, device, progress, stream=stream)
    report.summary["stream"] = {"format": format, "stored_dtype": _stored_dtype(ckpt), "offload": off is not None,
                                "resumed_at_block": stream.resumed_at}
    t0 = time.perf_counter()
    report.source = str(where)
    man = {**report.to_dict(), **(manifest or {})}
    stream.finish(out, man, config_update=None if compress is None else compress.config(report), overwrite=overwrite)
    report.times["write_s"] = time.perf_counter() - t0
    report.times["total_s"] = time.perf_counter() - t_start
    report.summary["disk_bytes"] = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return report


def _stored_dtype(ckpt: Checkpoint) -> str:
    kinds = {str(ckpt.dtype(k)).replace("torch.", "") for k in ckpt.names if ckpt.dtype(k) is not None}
    return ",".join(sorted(kinds))
