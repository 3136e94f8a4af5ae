"""LoRAPrune (Zhang et al. 2023, "LoRAPrune: structured pruning meets low-rank parameter-efficient fine-tuning"):
heads and MLP channels ranked by an importance that needs only the LoRA adapters' weights and gradients, so the
base weights stay frozen (``requires_grad`` False, no full-size gradient is ever formed: the memory saving).

Importance of one weight, from a LoRA layer ``W + s B A`` (peft, ``s = alpha / r``):

* the weight gradient estimated from the adapters' (the paper's eq. 8, as its code computes it):
  ``G = dL/dB A + B dL/dA - dL/dB dL/dA`` (the change of ``B A`` one unit gradient step of each adapter makes);
* ``I = |G * (W + s B A)|``, element-wise; a unit (query head, kv head, MLP channel) sums its rows of the input
  projections and its columns of the output projection, as the other criteria do
  (:func:`prunekit.structure.importance.elementwise`). Each matrix's group scores are divided by their L2 norm
  (the paper's per-layer normalization) unless ``normalize=False``.

Over the LoRA fine-tuning steps the scores are a moving average ``S = beta S + (1 - beta) I`` (zeros at the start),
taken just before each optimizer step. Pruning is iterative: ``lora_steps`` are split into ``rounds + 1`` equal
segments; after each of the first ``rounds`` the LoRA is merged into the weights and one part of the target
(:func:`~prunekit.structure.prune.split_amounts`) is removed by :func:`~prunekit.structure.prune.prune_structured`
with these scores; the last segment fine-tunes the final pruned model (merged too). The moving average restarts with each
segment (the units' indices change when a round removes some). Training runs in :func:`prunekit.core.loop.train_loop`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn

from prunekit.arch import adapter_for, target_layers
from prunekit.arch.base import Adapter
from prunekit.core.loop import LoopResult, make_optimizer, make_schedule, train_loop
from prunekit.errors import PruneError
from prunekit.linear import weight_matrix
from prunekit.recipe import Recipe, Structure
from prunekit.report import Report
from prunekit.structure import importance as imp
from prunekit.structure.shrink import (
    attention_removed,
    block_heads,
    block_width,
    count_params,
    layer_sizes,
    mlp_removed,
)

ADAPTER = "default"  # peft's adapter name
MAX_GRAD_NORM = 1.0
WARMUP_FRACTION = 0.1
MIN_LR_FACTOR = 0.1


class LoRA:
    """peft LoRA adapters on every linear layer of the decoder blocks, the base weights frozen. ``merge()`` folds them
    into the weights, ``discard()`` drops them; either way the model is its own class again with its
    ``requires_grad`` flags as they were."""

    def __init__(self, model: nn.Module, rank: int, alpha: float, seed: int = 0):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        names = [name for block in target_layers(model, adapter_for(model)) for name, _ in block]
        conv = any(type(m).__name__ == "Conv1D" for block in target_layers(model, adapter_for(model)) for _, m in block)
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=names,
                         fan_in_fan_out=conv)
        with torch.random.fork_rng(devices=[]):  # seeded adapter init; the caller's RNG is left alone
            torch.manual_seed(seed)
            self.peft = get_peft_model(model, cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: dict[int, nn.Module] = {}  # id(base layer) -> its LoRA layer
        self.params: list[nn.Parameter] = []
        for m in model.modules():
            if isinstance(m, LoraLayer):
                self.layers[id(m.base_layer)] = m
                for p in (m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight):
                    p.requires_grad_(True)
                    self.params.append(p)
        if len(self.layers) != len(names):
            self.discard()
            raise PruneError(f"peft placed LoRA adapters on {len(self.layers)} of {len(names)} block layers; this "
                             "model's layers are not supported by peft LoRA.")

    def _restore(self) -> None:
        for p, flag in self.flags:
            p.grad = None
            p.requires_grad_(flag)
        self.model.eval()

    def merge(self) -> None:
        with torch.no_grad():
            self.peft.merge_and_unload()
        self._restore()

    def discard(self) -> None:
        self.peft.unload()
        self._restore()


@contextmanager
def base_view(model: nn.Module):
    """Inside: every peft LoRA layer of ``model`` replaced by its base layer (so the shapes read as the plain
    model's; GPT-2's Conv1D keeps its ``[in, out]`` storage); put back on exit."""
    from peft.tuners.lora import LoraLayer

    swapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer) and "." in name:
            parent_name, attr = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            swapped.append((parent, attr, m))
            setattr(parent, attr, m.base_layer)
    try:
        yield
    finally:
        for parent, attr, m in swapped:
            setattr(parent, attr, m)


def element_scores(layer: nn.Module) -> torch.Tensor:
    """``|G * (W + s B A)|`` of one peft LoRA layer, ``[out, in]``, with ``G = gB A + B gA - gB gA`` from the
    adapters' gradients (the base weight has none)."""
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    if a.grad is None or b.grad is None:
        raise RuntimeError("LoRAPrune scores need the LoRA adapters' gradients (after backward, before zero_grad)")
    a, b, ga, gb = a.detach().float(), b.detach().float(), a.grad.float(), b.grad.float()
    grad = gb @ a + b @ ga - gb @ ga
    w = weight_matrix(layer.base_layer).float() + layer.scaling[ADAPTER] * (b @ a)
    return (grad * w).abs_()


def lora_scores(adapter: Adapter, model: nn.Module, lora: LoRA, normalize: bool = True) -> list[imp.LayerScores]:
    """One step's LoRAPrune importance of every query head, kv head and MLP channel (additive, per block)."""
    with base_view(model), torch.no_grad():
        hd = adapter.head_dim(model)
        attn, outs = set(), set()
        for block in adapter.blocks(model):
            if not attention_removed(adapter, block):
                parts = adapter.attn_parts(block)
                attn |= {id(m) for m in parts.values()}
                outs.add(id(parts["o"]))
            if not mlp_removed(adapter, block):
                outs.add(id(adapter.mlp_parts(block)[1]))

        def elem(m):
            e = element_scores(lora.layers[id(m)])
            if normalize:
                groups = e.sum(0) if id(m) in outs else e.sum(1)
                if id(m) in attn:
                    groups = groups.view(-1, hd).sum(1)
                e = e.div_(groups.norm() + 1e-8)
            return e, None

        return imp.elementwise(adapter, model, elem)


class MovingScores:
    """``S = beta S + (1 - beta) I`` per unit, starting from zeros (the paper's moving average over steps)."""

    def __init__(self, beta: float):
        self.beta = float(beta)
        self.value: list[imp.LayerScores] | None = None
        self.steps = 0

    def update(self, new: list[imp.LayerScores]) -> None:
        if self.value is None:
            self.value = [imp.LayerScores(*(None if t is None else torch.zeros_like(t) for t in (s.heads, s.kv, s.mlp)))
                          for s in new]
        for old, s in zip(self.value, new):
            for f in ("heads", "kv", "mlp"):
                t = getattr(s, f)
                if t is not None:
                    getattr(old, f).mul_(self.beta).add_(t, alpha=1.0 - self.beta)
        self.steps += 1


def segment_steps(steps: int, rounds: int) -> list[int]:
    """``steps`` split into ``rounds + 1`` segments (scoring before each round, then fine-tuning the final model),
    the first ones one longer when it does not divide. (Longer scoring segments score better: on SmolLM2 with 80
    steps, 2 rounds beat 4, and giving the fine-tuning half the steps did worse than an equal share.)"""
    base, extra = divmod(steps, rounds + 1)
    return [base + (1 if j < extra else 0) for j in range(rounds + 1)]


def train_segment(model: nn.Module, st: Structure, ids: torch.Tensor, steps: int, stream, *, score: bool,
                  seed: int = 0, progress: bool = True, desc: str = "loraprune",
                  prefix: torch.Tensor | None = None) -> tuple[list[imp.LayerScores] | None, LoopResult, int]:
    """``steps`` LoRA steps on mini-batches of ``ids`` from ``stream`` (base weights frozen), then the LoRA merged.
    With ``score`` the moving average of :func:`lora_scores` over the steps is returned (taken before each
    optimizer step, on the clipped gradients). ``prefix``: token ids put before every window, not scored (Compresso's
    collaborative prompt). Returns ``(scores or None, loop result, trainable parameters)``."""
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    lora = LoRA(model, st.lora_rank, st.lora_alpha, seed)
    avg = MovingScores(st.beta) if score else None
    ok = False
    try:
        opt = make_optimizer(lora.params, "adamw", st.lora_lr)
        sched = make_schedule(opt, "warmup-cosine", steps, warmup=max(1, round(WARMUP_FRACTION * steps)),
                              min_factor=MIN_LR_FACTOR)
        if score:
            opt.register_step_pre_hook(lambda *_: avg.update(lora_scores(adapter, model, lora)))

        def loss_fn(model, rows):
            x, labels = with_prefix(ids[rows], prefix)
            return model(input_ids=x.to(device), labels=labels.to(device), use_cache=False).loss, None

        res = train_loop(model, opt, [(next(stream) for _ in range(steps))], loss_fn, scheduler=sched,
                         clip=(lora.params, MAX_GRAD_NORM), total=steps, desc=desc, progress=progress,
                         diverged=lambda step, v: f"LoRA training diverged (loss {v} at step {step}); lower "
                                                  f"lora_lr (now {st.lora_lr:g}).")
        ok = True
    finally:
        if ok:
            lora.merge()
        else:
            lora.discard()
    return (avg.value if score else None), res, sum(p.numel() for p in lora.params)


def with_prefix(x: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input ids, labels)`` of windows ``x`` with ``prefix`` put before each (its positions labelled -100, so
    only the windows' tokens are scored)."""
    if prefix is None:
        return x, x
    n = x.shape[0]
    return torch.cat([prefix.expand(n, -1), x], 1), torch.cat([torch.full((n, prefix.numel()), -100), x], 1)


def _index_stream(n: int, batch_size: int, seed: int):
    from prunekit.train.recovery import _index_stream as stream

    return stream(n, batch_size, torch.Generator().manual_seed(seed))


def segment_scores(adapter: Adapter, model: nn.Module, st: Structure, ids: torch.Tensor, progress: bool = True):
    """One scoring segment (the first of :func:`segment_steps`) as a criterion: what
    :func:`~prunekit.structure.prune.scores_for` uses when a caller prunes in parts of its own (distillation's
    iterations)."""
    from prunekit.train.recovery import _check_tokens

    ids = _check_tokens(ids, model)
    steps = segment_steps(st.lora_steps, st.rounds)[0]
    scores, _, _ = train_segment(model, st, ids, steps, _index_stream(ids.shape[0], st.lora_batch_size, st.seed),
                                 score=True, seed=st.seed, progress=progress)
    return scores


def _units(adapter: Adapter, model: nn.Module) -> tuple[int, int]:
    blocks = adapter.blocks(model)
    return sum(block_heads(adapter, model, b)[0] for b in blocks), sum(block_width(adapter, b) for b in blocks)


def prune_loraprune(model: nn.Module, recipe: Recipe, calibration_batches: torch.Tensor, *, device: str = "cpu",
                    progress: bool = True) -> tuple[nn.Module, Report]:
    """LoRAPrune as ``recipe.structure`` says (criterion ``loraprune``): ``rounds`` rounds of LoRA training, scoring
    and removal to the target, then LoRA fine-tuning; the LoRA is merged, the model physically shrunk."""
    from prunekit.structure.prune import check, prune_structured, split_amounts, target_amounts
    from prunekit.train.recovery import _check_tokens

    st = recipe.structure
    adapter = adapter_for(model)
    check(adapter, model, st)
    ids = _check_tokens(calibration_batches, model)
    sizes = layer_sizes(adapter, model)
    shapes = {(s["heads"], s["kv_heads"], s["intermediate"]) for s in sizes}
    if st.rounds > 1 and len(shapes) > 1:
        raise PruneError("loraprune's rounds split one target over blocks of equal sizes, and this model's blocks "
                         "differ; use --rounds 1.")
    parts = [None] if st.rounds == 1 else split_amounts(target_amounts(adapter, model, st), st.rounds)
    steps = segment_steps(st.lora_steps, st.rounds)
    stream = _index_stream(ids.shape[0], st.lora_batch_size, st.seed)
    before, (heads0, width0) = count_params(model), _units(adapter, model)
    summaries, times, losses, seconds, trainable = [], {}, [], 0.0, 0
    t_all = time.perf_counter()
    for j, part in enumerate(parts):
        scores, res, trainable = train_segment(
            model, st, ids, steps[j], stream, score=True, seed=st.seed + j, progress=progress,
            desc=f"loraprune round {j + 1}/{len(parts)}")
        losses += res.losses
        seconds += res.seconds
        model, rep = prune_structured(model, recipe, ids, device=device, progress=progress, amounts=part,
                                      scores=scores)
        summaries.append(rep.summary)
        for k, v in rep.times.items():
            times[k] = times.get(k, 0.0) + v
    if steps[-1]:
        _, res, _ = train_segment(model, st, ids, steps[-1], stream, score=False, seed=st.seed + len(parts),
                                  progress=progress, desc="loraprune fine-tune")
        losses += res.losses
        seconds += res.seconds
    heads1, width1 = _units(adapter, model)
    summary = dict(summaries[-1])
    summary.update(params_before=before, params=count_params(model), num_layers=len(adapter.blocks(model)))
    summary["params_ratio"] = summary["params"] / before
    summary.pop("params_expected", None)  # each round checked its own
    if len(summaries) > 1:
        summary.pop("plan", None)
        summary["parts"] = [{k: s[k] for k in ("heads_removed", "mlp_removed", "params") if k in s} for s in summaries]
    if "heads" in st.kinds:
        summary.update(heads_removed=f"{heads0 - heads1}/{heads0}", heads_ratio=(heads0 - heads1) / max(heads0, 1))
    if "mlp" in st.kinds:
        summary.update(mlp_removed=f"{width0 - width1}/{width0}", mlp_ratio=(width0 - width1) / max(width0, 1))
    k = max(1, len(losses) // 10)
    summary["loraprune"] = {
        "rounds": len(parts), "steps": sum(steps), "segment_steps": steps, "beta": st.beta,
        "trainable_params": trainable, "seconds": seconds,
        "loss_first": sum(losses[:k]) / k if losses else float("nan"),
        "loss_last": sum(losses[-k:]) / k if losses else float("nan"),
    }
    times["lora_s"] = seconds
    times["prune_s"] = time.perf_counter() - t_all
    layers = {f"{adapter.blocks_path}.{i}": s for i, s in enumerate(layer_sizes(adapter, model))}
    return model, Report(recipe=recipe.model_dump(), layers=layers, summary=summary, times=times)
