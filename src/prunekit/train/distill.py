"""Compress, then distil (Minitron, Sreenivas et al. 2024): prune, then train every weight of the pruned model
towards the dense teacher, optionally in several parts.

:func:`compress_and_distill` runs a recipe with a ``distill`` section (:class:`prunekit.recipe.Distill`):

1. the recipe's pruning, as :func:`prunekit.api.prune` would do it (a structure section, or sparsity pruning);
   with a structure section and ``iterations = K > 1`` the one-shot target (:func:`~prunekit.structure.prune.
   target_amounts`) is split into K parts (:func:`~prunekit.structure.prune.split_amounts`), each scored on the
   model distilled so far; the parts add up to exactly the one-shot structure;
2. after each part, ``steps / K`` steps of :func:`distill_part`: AdamW on every weight (after sparsity pruning
   the zeros are kept: the masks are attached to the optimizer), linear warmup then cosine, gradient clipping,
   in the one training loop (:func:`prunekit.core.loop.train_loop`). The loss is
   ``logit_weight * T^2 KL(teacher || student) + hidden_weight * H + lm_weight * CE`` where ``H`` is the mean over
   the student's blocks of ``||h_s - h_t||^2 / ||h_t||^2``, ``h_t`` the output of the teacher block the student
   block came from, on the residual channels the student kept (:class:`Lineage`).

Schedule ``adapt-pruner`` (Pan et al. 2024, Adapt-Pruner / Adapt-Accel): the parts are the same totals of heads /
MLP units, but each is shared out over the blocks anew (:func:`adapt_pruner_amounts`): before part t every
block's angular distance ``d_l`` (:func:`prunekit.structure.similarity.block_distances`) is measured on the model
distilled so far and normalized to ``I_l`` in [-1, 1] (centred, divided by the largest deviation); block l's
removed fraction of its source weights moves from where it is by ``e - adapt_amplitude * I_l`` (never back;
``e`` = the part's even step, about sparsity / K), and :func:`~prunekit.core.masks.round_to_total` makes the
part's counts add up to exactly its total (every block keeping a unit). Blocks whose output resembles their
input lose more; after K parts the model has exactly the one-shot totals of heads and MLP units (the uniform
counts summed over the blocks). Within a block the structure's criterion picks the units.

Every run's summary has ``journey`` (:class:`prunekit.core.journey.Journey`): the live parameters during each
part's training steps, from the dense count (0 steps) to the final one, and their average over the steps.

Checkpoints (``work_dir``; the CLI puts it beside ``--out`` as ``.<out>.distill``): every ``checkpoint_every``
steps and at the end of each part, the student (its own shapes), the optimizer state, the masks and
``state.json`` (where the run is, and a fingerprint of the dense weights, the token ids, the recipe and the
prunekit version) are written to a temporary directory that then replaces the previous checkpoint in one
rename, so a checkpoint is whole or absent. ``resume=True`` continues from it and ends bit-identical to an
uninterrupted run (the data order and every random draw depend only on the seed and the step); a checkpoint
of another run is refused with a sentence. Nothing is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.arch import adapter_for, target_layers
from prunekit.core.journey import Journey, live_parameters
from prunekit.core.loop import kd_loss, make_optimizer, make_schedule, train_loop
from prunekit.core.masks import Masks
from prunekit.core.progress import hf_bars_off, say
from prunekit.errors import PruneError
from prunekit.recipe import Distill, Recipe
from prunekit.report import Report

WARMUP_FRACTION = 0.1  # of each part's steps
MIN_LR_FACTOR = 0.1
MAX_GRAD_NORM = 1.0
CHECKPOINT = "checkpoint"
STATE = "state.json"


def _after_checkpoint(step: int) -> None:
    """Called after the checkpoint of global step ``step`` is durably written (tests inject failures here)."""


@dataclass
class Lineage:
    """Where the student's parts came from in the teacher: ``blocks[i]`` is the teacher block of student block
    ``i``; ``hidden[c]`` the teacher residual channel of student channel ``c`` (None: all, in order)."""

    blocks: list[int]
    hidden: list[int] | None = None

    def after(self, summary: dict) -> Lineage:
        """The lineage after a structured pruning step whose report summary is ``summary``."""
        gone = set(summary.get("removed_layers") or [])
        blocks = [b for i, b in enumerate(self.blocks) if i not in gone]
        hidden = self.hidden
        if "hidden_kept" in summary:
            kept = summary["hidden_kept"]
            hidden = list(kept) if hidden is None else [hidden[c] for c in kept]
        return Lineage(blocks, hidden)


@dataclass
class RunState:
    """Where a distillation run is: part ``part`` (0-based), ``part_step`` steps of it done, whether that part's
    pruning is done, the lineage, the losses so far and the summaries of the pruning steps."""

    part: int = 0
    part_step: int = 0
    pruned: bool = False
    lineage: Lineage | None = None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    prune_summaries: list[dict] = field(default_factory=list)
    prune_times: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # what after_prune measured
    journey: list[int] = field(default_factory=list)  # live parameters after each part's pruning

    def to_json(self) -> dict:
        return {"part": self.part, "part_step": self.part_step, "pruned": self.pruned, "metrics": self.metrics,
                "lineage": None if self.lineage is None else {"blocks": self.lineage.blocks, "hidden": self.lineage.hidden},
                "losses": self.losses, "seconds": self.seconds, "prune_summaries": self.prune_summaries,
                "prune_times": self.prune_times, "journey": self.journey}

    @classmethod
    def from_json(cls, d: dict) -> RunState:
        lin = d.get("lineage")
        return cls(d["part"], d["part_step"], d["pruned"], None if lin is None else Lineage(lin["blocks"], lin["hidden"]),
                   list(d.get("losses", [])), float(d.get("seconds", 0.0)), list(d.get("prune_summaries", [])),
                   list(d.get("prune_times", [])), dict(d.get("metrics", {})), list(d.get("journey", [])))


# ---- the loss ---------------------------------------------------------------------------------------------------

class _BlockOutputs:
    """Forward hooks that keep the output hidden states of every decoder block of ``model``."""

    def __init__(self, model: nn.Module):
        self.values: list[torch.Tensor] = []
        blocks = adapter_for(model).blocks(model)
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, _mod, _inp, out):
        self.values.append(out[0] if isinstance(out, (tuple, list)) else out)

    def take(self) -> list[torch.Tensor]:
        v, self.values = self.values, []
        return v

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], lineage: Lineage) -> torch.Tensor:
    """Mean over the student's blocks of ||h_s - h_t||^2 / ||h_t||^2, ``h_t`` the teacher block the student block
    came from, restricted to the residual channels the student kept."""
    if len(student) != len(lineage.blocks):
        raise RuntimeError(f"{len(student)} student block outputs for a lineage of {len(lineage.blocks)} blocks")
    idx = None if lineage.hidden is None else torch.tensor(lineage.hidden, device=student[0].device)
    total = student[0].new_zeros((), dtype=torch.float32)
    for hs, b in zip(student, lineage.blocks):
        ht = teacher[b].float()
        if idx is not None:
            ht = ht.index_select(-1, idx)
        total = total + (hs.float() - ht).pow(2).mean() / ht.pow(2).mean().clamp_min(1e-12)
    return total / len(student)


def distill_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, cfg: Distill, lineage: Lineage,
                 taps: tuple[_BlockOutputs, _BlockOutputs] | None) -> torch.Tensor:
    """The loss of one batch ``x`` (token ids); ``taps`` = (student, teacher) block-output hooks when
    ``cfg.hidden_weight`` > 0."""
    bf16 = cfg.precision == "bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and x.device.type == "cpu"):
        t_logits = teacher(input_ids=x, use_cache=False).logits
    t_hidden = taps[1].take() if taps is not None else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        s_logits = student(input_ids=x, use_cache=False).logits
    s_hidden = taps[0].take() if taps is not None else None
    loss = s_logits.new_zeros((), dtype=torch.float32)
    if cfg.logit_weight:
        loss = loss + cfg.logit_weight * kd_loss(s_logits[:, :-1].float(), t_logits[:, :-1].float(), cfg.temperature)
    if cfg.lm_weight:
        logits = s_logits[:, :-1].float()
        loss = loss + cfg.lm_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    if cfg.hidden_weight:
        loss = loss + cfg.hidden_weight * hidden_loss(s_hidden, t_hidden, lineage)
    return loss


# ---- checkpoints ------------------------------------------------------------------------------------------------

def fingerprint(model: nn.Module, ids: list[torch.Tensor | None], recipe: Recipe) -> dict:
    """What identifies a run: the dense weights, the token ids (calibration, distillation), the recipe, the
    prunekit version."""
    from prunekit import __version__
    from prunekit.io import dumps

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    d = hashlib.sha256()
    for t in ids:
        d.update(b"none" if t is None else t.to(torch.int64).contiguous().numpy().tobytes() + str(tuple(t.shape)).encode())
    return {"model": h.hexdigest(), "data": d.hexdigest(),
            "recipe": hashlib.sha256(dumps(recipe.model_dump(), indent=None).encode()).hexdigest(), "prunekit": __version__}


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _pack(masks: Masks | None) -> dict[str, torch.Tensor]:
    if masks is None:
        return {}
    return {k: torch.from_numpy(np.packbits(v.cpu().numpy().reshape(-1))) for k, v in masks.items()}


def _unpack(tensors: dict[str, torch.Tensor], model: nn.Module) -> Masks:
    params = dict(model.named_parameters())
    out = {}
    for k, bits in tensors.items():
        p = params[k]
        out[k] = torch.from_numpy(np.unpackbits(bits.numpy())[: p.numel()].astype(bool)).view(p.shape)
    return Masks(out)


def save_checkpoint(work: Path, student: nn.Module, opt: torch.optim.Optimizer | None, masks: Masks | None,
                    state: RunState, fp: dict) -> None:
    """Write the checkpoint whole (a temporary directory renamed over the previous one)."""
    from safetensors.torch import save_file

    from prunekit.io import atomic_dir, dumps
    from prunekit.structure.saved import SIZES_KEY, mark_config_file

    with atomic_dir(work / CHECKPOINT) as tmp:
        with hf_bars_off():
            student.save_pretrained(tmp / "student", safe_serialization=True)
        if getattr(student.config, SIZES_KEY, None) is not None:
            mark_config_file(tmp / "student")
        meta = {}
        if opt is not None:
            tensors, meta = _flat_optimizer(opt)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        if masks is not None:
            save_file(_pack(masks), str(tmp / "masks.safetensors"))
        (tmp / STATE).write_text(dumps({"fingerprint": fp, "state": state.to_json(), "optimizer": meta}))


def _load_student(d: Path) -> nn.Module:
    """The student of a checkpoint (written by :func:`save_checkpoint`: per-layer sizes or a stock config)."""
    from transformers import AutoModelForCausalLM

    from prunekit.structure.saved import is_structured_dir, load_structured

    with hf_bars_off():
        if is_structured_dir(d):
            return load_structured(d)[0]
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, trust_remote_code=False).eval()


def load_checkpoint(work: Path, fp: dict) -> tuple[nn.Module, dict | None, Masks | None, RunState] | None:
    """The checkpoint in ``work`` (None when there is none); a checkpoint of another run is one sentence."""
    from safetensors.torch import load_file

    d = work / CHECKPOINT
    if not (d / STATE).is_file():
        return None
    try:
        saved = json.loads((d / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        raise PruneError(f"The distillation checkpoint {d} is unreadable; delete {work} and start again.") from None
    old = saved.get("fingerprint", {})
    for part in ("model", "data", "recipe", "prunekit"):
        if old.get(part) != fp.get(part):
            raise PruneError(f"The distillation checkpoint {work} belongs to a different run (its {part} differs); run "
                             "without --resume to start over, or give the same model, data and recipe.")
    student = _load_student(d / "student")
    opt_state = None
    if (d / "optimizer.safetensors").is_file():
        opt_state = _unflat_optimizer(load_file(str(d / "optimizer.safetensors")), saved["optimizer"])
    masks = _unpack(load_file(str(d / "masks.safetensors")), student) if (d / "masks.safetensors").is_file() else None
    return student, opt_state, masks, RunState.from_json(saved["state"])


# ---- one part of the schedule -------------------------------------------------------------------------------------

def _index_stream(n: int, batch_size: int, gen: torch.Generator):
    from prunekit.train.recovery import _index_stream as stream

    return stream(n, batch_size, gen)


def distill_part(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: Distill, lineage: Lineage, *,
                 part: int, steps: int, done: int = 0, global_done: int = 0, masks: Masks | None = None,
                 opt_state: dict | None = None, checkpoint=None, progress: bool = True, desc: str = "distill"):
    """Train ``student`` for steps ``done + 1 .. steps`` of part ``part`` (the part's data order and schedule
    depend only on ``cfg.seed``, ``part`` and the step, so a resumed part equals an uninterrupted one).
    ``checkpoint(opt, part_step, global_step, losses)`` is called every ``cfg.checkpoint_every`` steps and after
    the last one. Returns the :class:`~prunekit.core.loop.LoopResult`."""
    device = next(student.parameters()).device
    flags = [(p, p.requires_grad) for p in student.parameters()]
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = make_optimizer(params, "adamw", cfg.lr, weight_decay=0.0, fused=True)
    sched = make_schedule(opt, "warmup-cosine", steps, warmup=max(1, round(WARMUP_FRACTION * steps)), min_factor=MIN_LR_FACTOR)
    if done:
        with warnings.catch_warnings():  # stepping the schedule to where the run was, before the optimizer steps
            warnings.simplefilter("ignore")
            for _ in range(done):
                sched.step()
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    stream = _index_stream(ids.shape[0], cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 1009 + part))
    for _ in range(done):
        next(stream)
    taps = (_BlockOutputs(student), _BlockOutputs(teacher)) if cfg.hidden_weight else None
    step_of_part = [done]

    def loss_fn(model, rows):
        torch.manual_seed(cfg.seed * 1_000_003 + global_done + step_of_part[0] - done)  # dropout, if any: per step
        return distill_loss(model, teacher, ids[rows].to(device), cfg, lineage, taps), None

    def after_step(step, _epoch, _batch, _out, _loss):
        step_of_part[0] += 1
        if checkpoint is not None and (step_of_part[0] % cfg.checkpoint_every == 0 or step_of_part[0] == steps):
            checkpoint(opt, step_of_part[0], step, res_losses + [float(_loss.detach())])

    res_losses: list[float] = []

    def track(step, epoch, batch, out, loss):
        after_step(step, epoch, batch, out, loss)
        res_losses.append(float(loss.detach()))

    try:
        with torch.random.fork_rng(devices=[]):
            res = train_loop(
                student, opt, [(next(stream) for _ in range(steps - done))], loss_fn, scheduler=sched, masks=masks,
                clip=(params, MAX_GRAD_NORM), after_step=track, step0=global_done, total=steps - done, desc=desc,
                progress=progress,
                diverged=lambda step, v: f"Distillation diverged (loss {v} at step {step}); lower distill.lr (now {cfg.lr:g}).",
            )
        for p in params:
            if not bool(torch.isfinite(p).all()):
                raise PruneError(f"Distillation diverged: weights are not finite after step {res.step}; lower distill.lr (now {cfg.lr:g}).")
    finally:
        if taps is not None:
            taps[0].remove()
            taps[1].remove()
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        student.eval()
    return res


# ---- the pipeline -----------------------------------------------------------------------------------------------

def _merge_summaries(summaries: list[dict], model: nn.Module, recipe: Recipe) -> dict:
    """One structured summary for the parts: sizes of the final model, what each part removed."""
    from prunekit.structure.saved import why_not_stock
    from prunekit.structure.shrink import count_params

    out = dict(summaries[-1])
    out["params_before"] = summaries[0]["params_before"]
    out["params"] = count_params(model)
    out["params_ratio"] = out["params"] / out["params_before"]
    out["num_layers"] = len(adapter_for(model).blocks(model))
    if len(summaries) > 1:
        out["parts"] = [{k: v for k, v in s.items() if k in ("removed_layers", "removed_sublayers", "heads_removed",
                                                             "mlp_removed", "hidden_removed", "params")} for s in summaries]
        for key in ("heads_removed", "mlp_removed", "hidden_removed"):
            out.pop(key, None)
        out.pop("plan", None)
        out.pop("removed_layers", None)
        if out.get("format") == "prunekit":
            out["format_reason"] = why_not_stock(adapter_for(model), model)
    out.pop("hidden_kept", None)
    return out


def adapt_pruner_amounts(student: nn.Module, source: dict, recipe: Recipe, calibration_batches: torch.Tensor,
                         parts: list[dict], part: int, *, device: str = "cpu", progress: bool = False) -> dict:
    """Part ``part`` (0-based) of the adapt-pruner schedule (see the module doc): per-layer counts of heads /
    MLP units for :func:`~prunekit.structure.prune.prune_structured` (``amounts[kind]`` a list), from the block
    distances of ``student`` (the model distilled so far); ``source``: the dense model's
    :func:`~prunekit.structure.prune.unit_table`; ``parts``: the pooled totals of every part
    (:func:`~prunekit.structure.prune.split_amounts`)."""
    from prunekit.core.masks import round_to_total
    from prunekit.structure.prune import unit_table
    from prunekit.structure.similarity import block_distances, normalized_importance

    st, cfg = recipe.structure, recipe.distill
    adapter = adapter_for(student)
    dist = block_distances(adapter, student, calibration_batches, recipe.calibration.batch_size, device, progress,
                           desc=f"adapt-pruner distances {part + 1}/{len(parts)}")
    imp = normalized_importance(dist)
    src, now = source, unit_table(adapter, student, st)
    out: dict = {"layers": 0, "sublayers": 0, "hidden": 0}
    for kind in st.width_kinds:
        layers = [i for i, u in enumerate(now[kind]) if u is not None]
        # units removed so far, in the source's units (a GQA layer down to one query slice counts its kv groups
        # as units, so the count comes from the sizes: one source unit is share * size of the source sublayer)
        removed = {i: round((src[kind][i][2] - now[kind][i][2]) / (src[kind][i][1] * src[kind][i][2])) for i in layers}
        total = sum(p[kind] for p in parts[: part + 1]) - sum(removed.values())  # the cumulative target, exactly
        targets, caps = [], []
        for i in layers:
            share = src[kind][i][1]  # one unit's share of the source sublayer
            gone = removed[i] * share
            even = max(total, 0) / len(layers) * share  # this part's even step, as a fraction of the sublayer
            want = min(max(gone + even - cfg.adapt_amplitude * imp[i], gone), 1.0 - share)
            targets.append((want - gone) / share)
            caps.append(src[kind][i][0] - 1 - removed[i])
        counts = [0] * len(now[kind])
        for i, c in zip(layers, round_to_total(targets, max(total, 0), caps)):
            counts[i] = c
        out[kind] = counts
    return out


def _steps_per_part(steps: int, parts: int) -> list[int]:
    base, extra = divmod(steps, parts)
    return [base + (1 if j < extra else 0) for j in range(parts)]


def _open_work(work: Path, resume: bool, fp: dict):
    """The checkpoint to continue (``resume`` and one there), else a clean work directory."""
    import shutil

    if resume:
        loaded = load_checkpoint(work, fp)
        if loaded is not None:
            return loaded
    if work.exists():
        if (work / CHECKPOINT / STATE).is_file() or not any(work.iterdir()):
            if (work / CHECKPOINT / STATE).is_file():
                say(f"starting over: removing the earlier run's checkpoint {work}")
            shutil.rmtree(work)
        else:
            raise PruneError(f"{work} exists and is not a prunekit distillation checkpoint; move it away.")
    return None


def _final_report(student: nn.Module, recipe: Recipe, state: RunState, masks: Masks | None) -> Report:
    from prunekit.evaluate import layer_sparsity, size_summary

    adapter = adapter_for(student)
    if recipe.structure is not None:
        from prunekit.structure.shrink import layer_sizes

        summary = _merge_summaries(state.prune_summaries, student, recipe)
        layers = {f"{adapter.blocks_path}.{i}": s for i, s in enumerate(layer_sizes(adapter, student))}
    else:
        per_block = target_layers(student, adapter, recipe.exclude)
        flat = [t for block in per_block for t in block]
        layers, summary = layer_sparsity(flat), {**state.prune_summaries[-1], **size_summary(student, flat)}
    times: dict[str, float] = {}
    for t in state.prune_times:
        for k, v in t.items():
            times[k] = times.get(k, 0.0) + v
    return Report(recipe=recipe.model_dump(), layers=layers, summary=summary, times=times)


def compress_and_distill(
    model: nn.Module,
    recipe: Recipe,
    calibration_batches: torch.Tensor | None,
    distill_batches: torch.Tensor,
    *,
    teacher: nn.Module | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    after_prune=None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, Report]:
    """Prune ``model`` as ``recipe`` says and distil it from ``teacher`` (default: a copy of ``model`` taken
    first). Returns the student (``model`` itself unless a checkpoint was resumed) and the report.

    ``distill_batches``: int64 token ids ``[n, seqlen]`` (the distillation text's calibration split).
    ``work_dir``: where checkpoints go (None: no checkpoints); ``resume``: continue the checkpoint there.
    ``after_prune(model, report)``: called once the pruning is complete, before its distillation, when the
    schedule has one part (the CLI measures the one-shot perplexity there)."""
    from prunekit import api
    from prunekit.structure.prune import prune_structured, split_amounts, target_amounts, unit_table
    from prunekit.train.recovery import _check_tokens

    cfg = recipe.distill
    if cfg is None:
        raise PruneError("The recipe has no distill section.")
    ids = _check_tokens(distill_batches, model)
    adapter = adapter_for(model)
    adaptive = cfg.schedule == "adapt-pruner"
    parts: list[dict | None] = [None]
    if recipe.structure is not None and (cfg.iterations > 1 or adaptive):
        parts = split_amounts(target_amounts(adapter, model, recipe.structure, pooled=adaptive), cfg.iterations)
    source_units = unit_table(adapter, model, recipe.structure) if adaptive else None
    dense_live = live_parameters(model)
    part_steps = _steps_per_part(cfg.steps, len(parts))
    work = None if work_dir is None else Path(work_dir)
    fp = fingerprint(model, [calibration_batches, ids], recipe) if work is not None else {}

    own = teacher is None
    teacher = copy.deepcopy(model) if own else teacher
    if cfg.precision == "bf16" and next(teacher.parameters()).dtype != torch.bfloat16:
        teacher = (teacher if own else copy.deepcopy(teacher)).to(torch.bfloat16)  # the caller's teacher is left alone
    state = RunState(lineage=Lineage(list(range(len(adapter.blocks(model))))))
    student, opt_state, masks, resumed_at = model, None, None, None
    if work is not None:
        loaded = _open_work(work, resume, fp)
        if loaded is not None:
            student, opt_state, masks, state = loaded
            resumed_at = sum(part_steps[: state.part]) + state.part_step
            say(f"resuming the distillation in {work} at step {resumed_at} of {cfg.steps} (part {state.part + 1} of {len(parts)})")

    for part in range(state.part, len(parts)):
        if not state.pruned:
            if recipe.structure is not None:
                amounts = parts[part]
                if adaptive:
                    amounts = adapt_pruner_amounts(student, source_units, recipe, calibration_batches, parts, part,
                                                   device=device, progress=progress)
                student, rep = prune_structured(student, recipe, calibration_batches, device=device, progress=progress,
                                                amounts=amounts)
                state.lineage = state.lineage.after(rep.summary)
            else:
                student, rep = api._prune_only(student, recipe, calibration_batches, device, progress)
                names = [f"{n}.weight" for block in target_layers(student, adapter_for(student), recipe.exclude) for n, _ in block]
                masks = Masks.from_zeros(student, names)
            state.prune_summaries.append({k: v for k, v in rep.summary.items() if k != "block_influence"})
            state.prune_times.append(dict(rep.times))
            state.journey.append(live_parameters(student, masks))
            state.pruned, state.part_step, opt_state = True, 0, None
            if after_prune is not None and len(parts) == 1:
                after_prune(student, rep)
                state.metrics = dict(rep.metrics)
        t_part = time.perf_counter()
        losses_before, seconds_before = list(state.losses), state.seconds

        def checkpoint(opt, part_step, global_step, part_losses, part=part):
            snap = RunState(part, part_step, True, state.lineage, losses_before + part_losses,
                            seconds_before + time.perf_counter() - t_part, state.prune_summaries, state.prune_times,
                            state.metrics, state.journey)
            save_checkpoint(work, student, opt, masks, snap, fp)
            _after_checkpoint(global_step)

        res = distill_part(student, teacher, ids, cfg, state.lineage, part=part, steps=part_steps[part],
                           done=state.part_step, global_done=sum(part_steps[:part]) + state.part_step, masks=masks,
                           opt_state=opt_state, checkpoint=None if work is None else checkpoint, progress=progress,
                           desc=f"distill part {part + 1}/{len(parts)}" if len(parts) > 1 else "distill")
        state.losses += res.losses
        state.seconds += res.seconds
        state.part, state.part_step, state.pruned, opt_state = part + 1, 0, False, None

    report = _final_report(student, recipe, state, masks)
    report.metrics.update(state.metrics)
    k = max(1, len(state.losses) // 10)
    report.summary["distill"] = {
        "steps": cfg.steps, "parts": len(parts), "precision": cfg.precision,
        "tokens": cfg.steps * cfg.batch_size * int(ids.shape[1]),
        "loss_first": sum(state.losses[:k]) / k if state.losses else float("nan"),
        "loss_last": sum(state.losses[-k:]) / k if state.losses else float("nan"),
        "seconds": state.seconds, **({"resumed_at_step": resumed_at} if resumed_at is not None else {}),
    }
    report.times["distill_s"] = state.seconds
    journey = Journey()
    journey.add(dense_live, steps=0)
    for live, n in zip(state.journey, part_steps):
        journey.add(live, steps=n)
    report.summary["journey"] = journey.summary()
    return student, report
