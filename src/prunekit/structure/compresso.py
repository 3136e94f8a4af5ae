"""Compresso (Guo et al. 2023, "Compresso: structured pruning with collaborative prompting learns compact large
language models"): which heads and MLP channels go is *learned*, not scored.

* One hard-concrete gate (:mod:`~prunekit.structure.hardconcrete`) per removable unit of every layer: an MLP channel,
  an attention head, or with grouped-query attention what :mod:`~prunekit.structure.plan` removes together (a slice
  of one query head from every kv group, ``gqa query``; a whole kv group, ``gqa kv``). A head gate multiplies its
  heads' part of the o_proj input, a channel gate its down_proj input (forward pre-hooks, so the LoRA path is gated
  too).
* The gates' ``log_alpha`` are trained jointly with LoRA adapters on every block linear layer (base weights frozen)
  on the calibration windows for the first half of ``lora_steps``: loss = LM loss + the Lagrangian
  ``lambda1 (s - t) + lambda2 (s - t)^2`` per kind, with ``s`` the expected share of units kept (the mean of
  ``P(gate != 0)``) and ``t`` the target's, per layer (uniform, summed over the layers) or over all layers
  (``global_rank``, times the number of layers). The target is reached linearly over the first 40% of these steps
  (CoFi's Lagrangian warm-up). The gates descend (AdamW, ``gate_lr``); the multipliers climb by plain gradient
  ascent after every step (step ``gate_lr / 10``: Adam's fixed-size steps, as CoFi uses, overshoot the target badly
  in a run of a hundred steps). Training runs in :func:`prunekit.core.loop.train_loop`.
* Made permanent: the LoRA is merged; exactly the target's count of units is kept (the highest ``log_alpha``, per
  layer or over all layers with every layer keeping its best unit), each kept unit's deterministic test-time gate
  is folded into its o_proj / down_proj columns, and the other units are physically removed by
  :mod:`~prunekit.structure.shrink`. The shrunk model computes exactly what the model with the deterministic gates
  computes; with equal per-layer counts (uniform) its config is stock and plain transformers loads it. The other half
  of ``lora_steps`` fine-tune the shrunk model with fresh LoRA adapters (merged), as Compresso fine-tunes after
  pruning.
* The collaborative prompt (optional, for instruction models): :data:`PROMPT` is put before every training window
  (its tokens are not scored), telling the model it is being pruned; use the same prompt when the pruned model is
  used. prunekit's perplexity is measured without it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prunekit.arch import adapter_for
from prunekit.arch.base import Adapter
from prunekit.core.loop import make_optimizer, make_schedule, train_loop
from prunekit.core.masks import keep_highest
from prunekit.errors import PruneError
from prunekit.linear import weight_matrix
from prunekit.recipe import Recipe, Structure
from prunekit.report import Report
from prunekit.structure import hardconcrete as hc
from prunekit.structure import importance as imp
from prunekit.structure.loraprune import LoRA, MAX_GRAD_NORM, MIN_LR_FACTOR, WARMUP_FRACTION, train_segment, with_prefix
from prunekit.structure.plan import Units, build_units, kept_heads, make_plan, removed_params, select
from prunekit.structure.saved import finalize_config, why_not_stock
from prunekit.structure.shrink import block_heads, block_width, count_params, layer_sizes, shrink_heads, shrink_mlp

PROMPT = ("System note: this language model is being compressed right now. Some of its attention heads and MLP "
          "channels are being removed to make it smaller and faster. Keep predicting the text below as well as you "
          "can with what remains.\n\n")
TARGET_WARMUP = 0.4  # the share of the gates' steps over which the target size is reached linearly
FINETUNE_SHARE = 0.5  # the share of lora_steps spent fine-tuning (LoRA) after the removal, as Compresso does
DUAL_FACTOR = 0.1  # the multipliers' plain ascent step is gate_lr times this (faster ones overshoot the target)


def _zero_scores(adapter: Adapter, model: nn.Module) -> list[imp.LayerScores]:
    out = []
    for block in adapter.blocks(model):
        h, k = block_heads(adapter, model, block)
        w = block_width(adapter, block)
        out.append(imp.LayerScores(torch.zeros(h) if h else None, torch.zeros(k) if h else None,
                                   torch.zeros(w) if w else None))
    return out


class Gates(nn.Module):
    """The hard-concrete gates of every unit of ``st.width_kinds`` in every layer, their Lagrange multipliers, the
    target counts, and (after :meth:`freeze`) the deterministic gates of the units kept."""

    def __init__(self, adapter: Adapter, model: nn.Module, st: Structure, keep_prob: float = 0.95):
        super().__init__()
        self.global_rank = st.global_rank
        self.kinds = list(st.width_kinds)
        zeros = _zero_scores(adapter, model)
        self.units: dict[str, list[Units | None]] = {}
        self.remove: dict[str, list[int]] = {}  # units removed per layer (uniform) / in all (global: their sum)
        self.log_alpha = nn.ParameterDict()
        self.lambdas = nn.ParameterDict()
        for kind in self.kinds:
            units = build_units(adapter, model, zeros, kind, "random", st.gqa)  # zeros: fixed slices g * per_group + j
            self.units[kind] = units
            self.remove[kind] = [len(r) for r in select(units, st.sparsity, st.global_rank, kind)]
            for i, u in enumerate(units):
                if u is not None:
                    self.log_alpha[f"{kind}_{i}"] = nn.Parameter(hc.init_log_alpha(u.scores.numel(), keep_prob))
            for j in (1, 2):
                self.lambdas[f"{kind}_{j}"] = hc.ascend(nn.Parameter(torch.zeros(())))
        self.z: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] | None = None
        self.removed: dict[str, list[list[int]]] | None = None

    def layers(self, kind: str) -> list[int]:
        return [i for i, u in enumerate(self.units[kind]) if u is not None]

    def resample(self) -> None:
        """New gate values for the next forward: samples while training, the deterministic gates after freeze."""
        self.z = dict(self.fixed) if self.fixed is not None else {k: hc.sample(la) for k, la in self.log_alpha.items()}

    def gaps(self, kind: str, ramp: float = 1.0) -> torch.Tensor:
        """``s - t`` of one kind: the expected share of units kept (the mean of ``P(gate != 0)``) minus the target's
        (reached to the fraction ``ramp``), one per layer (uniform) or one for all layers (global, times the number
        of layers, so one unit pulls as hard as in a per-layer gap)."""
        layers = self.layers(kind)
        probs = [hc.prob_nonzero(self.log_alpha[f"{kind}_{i}"]) for i in layers]
        n = torch.tensor([float(p.numel()) for p in probs], device=probs[0].device)
        removed = torch.tensor([float(self.remove[kind][i]) for i in layers], device=probs[0].device)
        s = torch.stack([p.sum() for p in probs])
        if self.global_rank:
            return (len(layers) * (s.sum() - (n.sum() - removed.sum() * ramp)) / n.sum()).unsqueeze(0)
        return (s - (n - removed * ramp)) / n

    def penalty(self, ramp: float = 1.0) -> torch.Tensor:
        """The Lagrangian size term summed over the kinds, the target reached to the fraction ``ramp``."""
        total = torch.zeros((), device=next(iter(self.log_alpha.values())).device)
        for kind in self.kinds:
            total = total + hc.lagrangian(self.gaps(kind, ramp), self.lambdas[f"{kind}_1"], self.lambdas[f"{kind}_2"])
        return total

    @torch.no_grad()
    def dual_step(self, lr: float) -> None:
        """One plain gradient step of the multipliers on the last backward's gradients (which :func:`hc.ascend` made
        ascent directions): ``lambda1 += lr sum(s - t)``, ``lambda2 += lr sum((s - t)^2)``. Plain steps, not Adam's
        fixed-size ones, so a multiplier stops growing as its gap closes instead of overshooting."""
        for p in self.lambdas.values():
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.log_alpha.values():
            p.clamp_(*hc.LOG_ALPHA_RANGE)

    @torch.no_grad()
    def freeze(self) -> None:
        """Keep exactly the target's count of units (highest ``log_alpha``; global: every layer keeps its best one),
        give the kept ones their deterministic test-time gate and the others 0; from now on :meth:`resample` gives
        these."""
        self.fixed, self.removed = {}, {}
        for kind in self.kinds:
            layers = self.layers(kind)
            las = {i: self.log_alpha[f"{kind}_{i}"].detach().float() for i in layers}
            if self.global_rank:
                ranked = []
                for i in layers:
                    r = las[i].clone()
                    r[int(r.argmax())] = float("inf")
                    ranked.append(r)
                flat = torch.cat(ranked)
                kept = keep_highest(flat, flat.numel() - sum(self.remove[kind])).split([las[i].numel() for i in layers])
            else:
                kept = [keep_highest(las[i], las[i].numel() - self.remove[kind][i]) for i in layers]
            removed = [[] for _ in self.units[kind]]
            for i, keep in zip(layers, kept):
                self.fixed[f"{kind}_{i}"] = hc.deterministic_gate(las[i]) * keep
                removed[i] = (~keep).nonzero().squeeze(1).tolist()
            self.removed[kind] = removed
        self.z = dict(self.fixed)

    def expected(self) -> dict[str, dict[str, float]]:
        """Per kind: the expected kept share of its units now and the target's (over all layers)."""
        out = {}
        with torch.no_grad():
            for kind in self.kinds:
                layers = self.layers(kind)
                probs = torch.cat([hc.prob_nonzero(self.log_alpha[f"{kind}_{i}"]) for i in layers])
                n = probs.numel()
                out[kind] = {"expected_kept": round(float(probs.mean()), 4),
                             "target_kept": round(1 - sum(self.remove[kind][i] for i in layers) / n, 4),
                             "lambda1": round(float(self.lambdas[f"{kind}_1"].detach()), 4),
                             "lambda2": round(float(self.lambdas[f"{kind}_2"].detach()), 4)}
        return out


def _head_owner(units: Units, heads: int) -> torch.Tensor:
    """For every query head, the index of the unit it belongs to."""
    owner = torch.empty(heads, dtype=torch.long)
    for j, (q, _kv) in enumerate(units.members):
        owner[q] = j
    return owner


def attach_gates(adapter: Adapter, model: nn.Module, gates: Gates) -> list:
    """Forward pre-hooks that multiply each head's part of the o_proj input and each channel of the down_proj input
    by its gate (on the modules there now: peft's LoRA layers when adapters are attached), and one on the model that
    draws the gates of each forward. Returns the handles (``.remove()`` each)."""
    hd = adapter.head_dim(model)
    handles = [model.register_forward_pre_hook(lambda _m, _a: gates.resample())]
    for i, block in enumerate(adapter.blocks(model)):
        if "heads" in gates.kinds and gates.units["heads"][i] is not None:
            h, _ = block_heads(adapter, model, block)
            cols = _head_owner(gates.units["heads"][i], h).repeat_interleave(hd)

            def head_hook(_m, args, key=f"heads_{i}", cols=cols):
                x = args[0]
                return (x * gates.z[key][cols.to(x.device)].to(x.dtype), *args[1:])

            handles.append(adapter.attn_parts(block)["o"].register_forward_pre_hook(head_hook))
        if "mlp" in gates.kinds and gates.units["mlp"][i] is not None:
            def mlp_hook(_m, args, key=f"mlp_{i}"):
                x = args[0]
                return (x * gates.z[key].to(x.device, x.dtype), *args[1:])

            handles.append(adapter.mlp_parts(block)[1].register_forward_pre_hook(mlp_hook))
    return handles


@torch.no_grad()
def make_permanent(adapter: Adapter, model: nn.Module, gates: Gates) -> dict:
    """Fold the frozen gates into the o_proj / down_proj columns and physically remove the units they drop (the
    model must carry no hooks or adapters). Returns the summary fields of the removal."""
    if gates.fixed is None:
        gates.freeze()
    hd = adapter.head_dim(model)
    blocks = adapter.blocks(model)
    before = count_params(model)
    heads_before = sum(block_heads(adapter, model, b)[0] for b in blocks)
    width_before = sum(block_width(adapter, b) for b in blocks)
    plan = make_plan(adapter, model, {k: gates.units[k] for k in gates.kinds}, gates.removed)
    expected = before - removed_params(adapter, model, plan)
    for i, block in enumerate(blocks):
        if "heads" in gates.kinds and gates.units["heads"][i] is not None:
            o = adapter.attn_parts(block)["o"]
            cols = _head_owner(gates.units["heads"][i], block_heads(adapter, model, block)[0]).repeat_interleave(hd)
            w = weight_matrix(o)
            w.mul_(gates.fixed[f"heads_{i}"][cols].to(w.device, w.dtype).unsqueeze(0))
        if "mlp" in gates.kinds and gates.units["mlp"][i] is not None:
            w = weight_matrix(adapter.mlp_parts(block)[1])
            w.mul_(gates.fixed[f"mlp_{i}"].to(w.device, w.dtype).unsqueeze(0))
    for i, lp in sorted(plan.items()):
        if lp.heads:
            shrink_heads(adapter, model, i, kept_heads(adapter, model, i, lp))
        if lp.channels:
            gone = set(lp.channels)
            shrink_mlp(adapter, model, i, [c for c in range(block_width(adapter, blocks[i])) if c not in gone])
    summary: dict = {"params_before": before}
    summary["plan"] = {str(i): {"heads": lp.heads, "kv_heads": lp.kv_heads, "channels": len(lp.channels)}
                       for i, lp in plan.items()}
    if "heads" in gates.kinds:
        gone = sum(len(lp.heads) for lp in plan.values())
        summary.update(heads_removed=f"{gone}/{heads_before}", heads_ratio=gone / max(heads_before, 1))
    if "mlp" in gates.kinds:
        gone = sum(len(lp.channels) for lp in plan.values())
        summary.update(mlp_removed=f"{gone}/{width_before}", mlp_ratio=gone / max(width_before, 1))
    reason = why_not_stock(adapter, model)
    summary["format"] = finalize_config(adapter, model)
    if summary["format"] == "prunekit":
        summary["format_reason"] = reason
    summary.update(params=count_params(model), params_expected=expected, num_layers=len(blocks))
    summary["params_ratio"] = summary["params"] / before
    if summary["params"] != expected:  # the shapes say what was removed; a mismatch is a bug, never silent
        raise RuntimeError(f"compresso left {summary['params']} parameters, the plan says {expected}")
    return summary


def prompt_ids(model: nn.Module, tokenizer=None) -> torch.Tensor:
    """The token ids of :data:`PROMPT` (the model's own tokenizer, from its directory when none is given)."""
    if tokenizer is None:
        src = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        except Exception:  # noqa: BLE001 - any failure means the same to the user
            raise PruneError("The collaborative prompt needs the model's tokenizer, and none was found beside the "
                             "model; pass tokenizer= or drop collaborative_prompt.") from None
    ids = torch.tensor(tokenizer(PROMPT, add_special_tokens=False)["input_ids"], dtype=torch.long)
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() == 0 or int(ids.max()) >= vocab:
        raise PruneError("The tokenizer does not fit the model (prompt token ids outside its vocabulary); use the "
                         "model's own tokenizer.")
    return ids


def prune_compresso(model: nn.Module, recipe: Recipe, calibration_batches: torch.Tensor, *, device: str = "cpu",
                    progress: bool = True, tokenizer=None) -> tuple[nn.Module, Report]:
    """Compresso as ``recipe.structure`` says (``learn: compresso``): gates and LoRA trained together on
    ``calibration_batches`` for half of ``lora_steps``, the gates made permanent and the model shrunk, then LoRA
    fine-tuning for the other half. ``tokenizer``: for the collaborative prompt (default: the model's own)."""
    from prunekit.structure.prune import check
    from prunekit.train.recovery import _check_tokens, _index_stream

    st = recipe.structure
    adapter = adapter_for(model)
    check(adapter, model, st)
    ids = _check_tokens(calibration_batches, model)
    prefix = prompt_ids(model, tokenizer) if st.collaborative_prompt else None
    if prefix is not None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and prefix.numel() + ids.shape[1] > limit:
            raise PruneError(f"The collaborative prompt ({prefix.numel()} tokens) and the {ids.shape[1]}-token windows "
                             f"exceed the model's {limit} positions; use a shorter --seqlen.")
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    tune = int(FINETUNE_SHARE * st.lora_steps)  # the LoRA steps after the removal
    steps = st.lora_steps - tune  # the gates' steps
    warm = max(1, round(TARGET_WARMUP * steps))
    stream = _index_stream(ids.shape[0], st.lora_batch_size, torch.Generator().manual_seed(st.seed))
    lm_losses: list[float] = []
    trace: list[dict] = []  # the expected kept shares along the way
    state = {"step": 0}
    with torch.random.fork_rng(devices=[]):  # seeded gates, adapters and samples; the caller's RNG is left alone
        torch.manual_seed(st.seed)
        gates = Gates(adapter, model, st).to(dev)
        lora = LoRA(model, st.lora_rank, st.lora_alpha, st.seed)
        handles, ok = [], False
        try:
            handles = attach_gates(adapter, model, gates)
            groups = [{"params": lora.params, "lr": st.lora_lr},
                      {"params": list(gates.log_alpha.values()), "lr": st.gate_lr}]
            opt = make_optimizer(groups, "adamw", st.lora_lr)
            sched = make_schedule(opt, "warmup-cosine", steps, warmup=max(1, round(WARMUP_FRACTION * steps)),
                                  min_factor=MIN_LR_FACTOR)

            def loss_fn(model, rows):
                x, labels = with_prefix(ids[rows], prefix)
                lm = model(input_ids=x.to(dev), labels=labels.to(dev), use_cache=False).loss
                lm_losses.append(float(lm.detach()))
                return lm + gates.penalty(min(1.0, state["step"] / warm)).to(lm.device), None

            every = max(1, steps // 10)

            def after(step, *_):
                state["step"] = step
                gates.dual_step(st.gate_lr * DUAL_FACTOR)
                gates.clamp_()
                if step % every == 0 or step == steps:
                    trace.append({"step": step, **{k: v["expected_kept"] for k, v in gates.expected().items()}})

            res = train_loop(model, opt, [(next(stream) for _ in range(steps))], loss_fn, scheduler=sched,
                             clip=(lora.params, MAX_GRAD_NORM), after_step=after, total=steps, desc="compresso",
                             progress=progress,
                             postfix=lambda: {k: f"{v['expected_kept']:.3f}" for k, v in gates.expected().items()},
                             diverged=lambda step, v: f"Compresso training diverged (loss {v} at step {step}); lower "
                                                      f"lora_lr (now {st.lora_lr:g}) or gate_lr (now {st.gate_lr:g}).")
            ok = True
        finally:
            for h in handles:
                h.remove()
            if ok:
                lora.merge()
            else:
                lora.discard()
    learned = gates.expected()
    gates.freeze()
    t1 = time.perf_counter()
    summary = make_permanent(adapter, model, gates)
    t2 = time.perf_counter()
    tuned = None
    if tune:
        _, tuned, _ = train_segment(model, st, ids, tune, stream, score=False, seed=st.seed + 1, progress=progress,
                                    desc="compresso fine-tune", prefix=prefix)
    k = max(1, len(lm_losses) // 10)
    summary["compresso"] = {
        "steps": st.lora_steps, "gate_steps": steps, "finetune_steps": tune,
        "seconds": res.seconds + (tuned.seconds if tuned else 0.0),
        "trainable_params": sum(p.numel() for p in lora.params)
        + sum(p.numel() for p in gates.log_alpha.values()),
        "lm_loss_first": sum(lm_losses[:k]) / k, "lm_loss_last": sum(lm_losses[-k:]) / k,
        **({"finetune_loss_last": tuned.summary()["loss_last"]} if tuned else {}),
        "gates": learned, "trace": trace, "collaborative_prompt": st.collaborative_prompt,
    }
    times = {"learn_s": t1 - t0, "shrink_s": t2 - t1, "finetune_s": time.perf_counter() - t2,
             "prune_s": time.perf_counter() - t0}
    layers = {f"{adapter.blocks_path}.{i}": s for i, s in enumerate(layer_sizes(adapter, model))}
    return model, Report(recipe=recipe.model_dump(), layers=layers, summary=summary, times=times)
