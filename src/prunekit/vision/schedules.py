"""When sparsity grows during training, and the one call that turns a criterion + allocation into masks.

Schedules (``SCHEDULES``):

* ``oneshot``   train dense, prune once to the target, fine-tune with the mask.
* ``gradual``   Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3 for t in
                {t0, t0 + dt, ..., t0 + n dt}; masks are recomputed every dt steps from t0 to t0 + n dt.
* ``lottery``   iterative magnitude pruning with weight rewinding (Frankle et al., 2019/2020): train, prune a
                fraction of the remaining weights, rewind the surviving weights to their values at an early
                iteration k, train again; sparsity after round r of R is 1 - (1 - s)^(r / R).
* ``at-init``   score at initialization (SNIP, GraSP, SynFlow, random/ERK...), then train with the fixed mask.
* ``scratch``   the control of Liu et al. (2019), "Rethinking the value of network pruning": the sparse
                structure found by pruning a trained model, re-initialized and trained from scratch.
* ``sap``       sparsity-informed adaptive pruning (Diao et al., ICLR 2023): lottery's rounds, but each round
                removes as many weights as the surviving weights' PQ index says they can lose
                (:mod:`prunekit.vision.pq`); the final sparsity is adaptive (``sparsity`` only caps it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunekit.core.allocate import allocate_masks
from prunekit.core.masks import Masks, check_sparsity, prunable
from prunekit.core.registry import Registry
from prunekit.errors import PruneError
from prunekit.vision.criteria import CRITERIA, score
from prunekit.vision.pq import SapOptions, sap_plan

SCHEDULES = Registry("schedule")
SCHEDULES.register_names((
    ("oneshot", "train dense, prune once, fine-tune with the mask"),
    ("gradual", "cubic sparsity ramp (Zhu & Gupta 2017)"),
    ("lottery", "iterative magnitude pruning with rewinding (Frankle et al.)"),
    ("at-init", "score at initialization, train with the fixed mask"),
    ("scratch", "a pruned model's mask on fresh weights (Liu et al. 2019)"),
))
SCHEDULES.register("sap", "sap", params=SapOptions, description="sparsity-informed adaptive pruning: each round's "
                   "amount from the PQ index (Diao et al. 2023); options p, q, eta_r, gamma, beta, scope")


def cubic_sparsity(step: int, start: int, end: int, final: float, initial: float = 0.0, every: int = 1) -> float:
    """Zhu & Gupta's cubic schedule at ``step``: ``initial`` before ``start``, ``final`` from ``end`` on, and in
    between s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3 with t rounded down to a multiple of ``every``
    after ``start`` (masks change only every ``every`` steps)."""
    check_sparsity(final)
    check_sparsity(initial, "initial sparsity")
    if end <= start:
        raise PruneError(f"The pruning schedule ends (step {end}) before it starts (step {start}); "
                         "make the end step larger than the start step.")
    if every < 1:
        raise PruneError(f"The pruning frequency must be at least 1 step; got {every}.")
    if step < start:
        return initial
    if step >= end:
        return final
    t = start + ((step - start) // every) * every
    frac = (t - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


def lottery_sparsities(final: float, rounds: int) -> list[float]:
    """Sparsity after each IMP round: the same fraction of the remaining weights is pruned each round."""
    check_sparsity(final)
    if rounds < 1:
        raise PruneError(f"Lottery-ticket pruning needs at least 1 round; got {rounds}.")
    return [1.0 - (1.0 - final) ** (r / rounds) for r in range(1, rounds + 1)]


def compute_masks(model: nn.Module, sparsity: float, criterion: str = "magnitude", allocation: str = "global",
                  min_density: float | None = None, batches=None, masks: Masks | None = None, seed: int = 0,
                  input_shape: Sequence[int] | None = None, iterations: int = 100, exclude: Sequence[str] = (),
                  options: dict | None = None) -> Masks:
    """Masks at ``sparsity`` from ``criterion`` scores spread by ``allocation``.

    ``masks``: weights already pruned stay pruned (their scores are -inf). SynFlow runs its iterative procedure
    (``iterations`` rounds, sparsity growing exponentially to the target, re-scored on the masked model).
    ``options``: the criterion's own options (keyword arguments of its params, e.g. lrp's ``rule``)."""
    check_sparsity(sparsity)
    criterion = CRITERIA.canonical(criterion)
    names = list(masks) if masks is not None else list(prunable(model, exclude))
    if criterion != "synflow":
        s = score(model, criterion, names, batches=batches, masks=masks, seed=seed, input_shape=input_shape,
                  options=options)
        return _allocate(s, sparsity, allocation, min_density, model, batches)
    if input_shape is None:
        raise PruneError("SynFlow needs the input shape (e.g. 1,28,28).")
    if iterations < 1:
        raise PruneError(f"SynFlow needs at least 1 iteration; got {iterations}.")
    start_density = 1.0 - (masks.sparsity() if masks is not None else 0.0)
    cur = masks
    for k in range(1, iterations + 1):
        s_k = 1.0 - start_density * ((1.0 - sparsity) / start_density) ** (k / iterations)
        s = score(model, "synflow", names, masks=cur, input_shape=input_shape)
        cur = _allocate(s, min(max(s_k, 0.0), sparsity), allocation, min_density, model, batches)
    return cur


RD_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def rd_curves(model: nn.Module, scores: dict[str, torch.Tensor], batches, grid=RD_GRID, max_inputs: int = 256) -> dict:
    """Allocation rd's curves for a vision model: for each layer alone, its lowest-scored weights zeroed to each
    sparsity of ``grid``, the mean squared change of the model's outputs (eval mode) on up to ``max_inputs``
    inputs of ``batches``; the weights are restored after each point."""
    from prunekit.core.masks import keep_highest, kept_total

    if not batches:
        raise PruneError("Allocation rd measures output distortion on inputs; give it batches of training images.")
    x = torch.cat([b[0] for b in batches])[:max_inputs]
    params = prunable(model)
    was = model.training
    model.eval()
    curves: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            ref = model(x).float()
            for name, sc in scores.items():
                p = params[name]
                saved = p.detach().clone()
                row = []
                for g in grid:
                    keep = keep_highest(sc.reshape(p.shape), kept_total(p.numel(), g))
                    p.mul_(keep.to(p.dtype))
                    row.append(float((model(x).float() - ref).pow(2).mean()))
                    p.copy_(saved)
                curves[name] = row
    finally:
        model.train(was)
    return curves


def _allocate(scores: dict[str, torch.Tensor], sparsity: float, allocation: str, min_density: float | None,
              model: nn.Module | None = None, batches=None) -> Masks:
    if allocation == "rd":
        return allocate_masks(scores, sparsity, "rd", rd_curves=rd_curves(model, scores, batches), rd_grid=list(RD_GRID))
    return allocate_masks(scores, sparsity, allocation, min_density=min_density or 0.0)


class Rewinder:
    """Keeps a copy of the weights at an early iteration and rewinds survivors to it (lottery ticket)."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] | None = None
        self.step: int | None = None

    def save(self, model: nn.Module, step: int) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.step = step

    @torch.no_grad()
    def rewind(self, model: nn.Module, masks: Masks) -> None:
        """Load the early state (all parameters and BatchNorm buffers), then zero the masked weights."""
        if self.state is None:
            raise PruneError("Nothing to rewind to: the early weights were never saved (rewind step beyond training?).")
        model.load_state_dict(self.state)
        masks.apply(model)


# -- schedules as objects for any training loop ---------------------------------------------------------------



def pruner(criterion: str = "magnitude", allocation: str = "global", *, min_density: float | None = None,
           batches=None, input_shape: Sequence[int] | None = None, iterations: int = 100, seed: int = 0,
           exclude: Sequence[str] = ()):
    """``prune(model, sparsity, masks) -> Masks``: :func:`compute_masks` with these settings (what a schedule
    calls each time it prunes)."""

    def prune(model: nn.Module, sparsity: float, masks: Masks | None = None) -> Masks:
        return compute_masks(model, sparsity, criterion, allocation, min_density, batches=batches, masks=masks,
                             seed=seed, input_shape=input_shape, iterations=iterations, exclude=exclude)

    return prune


class Schedule:
    """When to prune, as an object a training loop asks once per step, like an LR scheduler::

        schedule = Gradual(pruner("magnitude"), final=0.9, start=100, end=1000, every=50)
        for step, (x, y) in enumerate(batches):
            new = schedule.on_step(step, model)
            if new is not None:                  # masks changed: enforce the new ones from now on
                if masks is not None:
                    masks.detach()
                masks = new.attach(model, optimizer)
            ...  # forward, backward, optimizer.step()

    ``on_step(step, model)`` returns new :class:`Masks` on the steps where the schedule prunes, else None;
    ``masks`` holds the latest ones and ``log`` one row per pruning event.
    """

    def __init__(self, prune):
        self.prune = prune
        self.masks: Masks | None = None
        self.log: list[dict] = []

    def on_step(self, step: int, model: nn.Module) -> Masks | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _prune(self, step: int, model: nn.Module, sparsity: float, target: float | None = None) -> Masks:
        self.masks = self.prune(model, sparsity, self.masks)
        self.log.append({"step": step, "target": sparsity if target is None else target,
                         "sparsity": self.masks.sparsity()})
        return self.masks


class OneShot(Schedule):
    """Prune once to ``sparsity`` at step ``at`` (0: at initialization, SNIP / GraSP / SynFlow style)."""

    def __init__(self, prune, sparsity: float, at: int = 0):
        super().__init__(prune)
        self.sparsity, self.at = check_sparsity(sparsity), at

    def on_step(self, step: int, model: nn.Module) -> Masks | None:
        return self._prune(step, model, self.sparsity) if step == self.at else None


class Gradual(Schedule):
    """Zhu & Gupta's cubic ramp from ``initial`` at step ``start`` to ``final`` at step ``end``, masks recomputed
    every ``every`` steps (and at ``end``) from the surviving weights; no event when the target did not move."""

    def __init__(self, prune, final: float, start: int, end: int, every: int = 100, initial: float = 0.0):
        super().__init__(prune)
        cubic_sparsity(start, start, end, final, initial, every)  # validates the arguments
        self.final, self.start, self.end, self.every, self.initial = final, start, end, every, initial
        self._last: float | None = None

    def on_step(self, step: int, model: nn.Module) -> Masks | None:
        if step < self.start or (step - self.start) % self.every and step != self.end or step > self.end:
            return None
        s = cubic_sparsity(step, self.start, self.end, self.final, self.initial, self.every) if step < self.end else self.final
        if self._last is not None and abs(s - self._last) < 1e-12:
            return None
        self._last = s
        return self._prune(step, model, s)


class Lottery(Schedule):
    """Iterative magnitude pruning with rewinding in one loop: the weights at step ``rewind_step`` are kept; at the
    end of each round of ``round_steps`` steps the survivors are pruned to the round's target
    (:func:`lottery_sparsities`) and rewound to those weights. ``next_round(model, step)`` does one round's
    pruning + rewinding for a loop that restarts its optimizer per round (as ``prunekit train-prune`` does)."""

    def __init__(self, prune, final: float | None = None, rounds: int = 1, round_steps: int | None = None,
                 rewind_step: int = 0, targets: Sequence[float] | None = None):
        super().__init__(prune)
        if (final is None) == (targets is None):
            raise PruneError("Give the lottery schedule either a final sparsity (with rounds) or its targets.")
        self.targets = list(targets) if targets is not None else lottery_sparsities(final, rounds)
        self.round_steps, self.rewind_step = round_steps, rewind_step
        self.rewinder = Rewinder()
        self.round = 0

    def save_early(self, step: int, model: nn.Module) -> None:
        if step == self.rewind_step and self.rewinder.state is None:
            self.rewinder.save(model, step)

    def next_round(self, model: nn.Module, step: int) -> Masks:
        if self.rewinder.state is None:
            raise PruneError(f"The rewind step {self.rewind_step} is beyond the dense training; lower rewind_step.")
        target = self.targets[self.round]
        self.round += 1
        masks = self._prune(step, model, target)
        self.rewinder.rewind(model, masks)
        return masks

    def on_step(self, step: int, model: nn.Module) -> Masks | None:
        self.save_early(step, model)
        if (self.round_steps and step > 0 and step % self.round_steps == 0 and self.round < len(self.targets)):
            return self.next_round(model, step)
        return None


class Sap(Lottery):
    """SAP (Diao et al., ICLR 2023) as lottery-style rounds: at the end of each round the surviving weights' PQ index
    (:func:`prunekit.vision.pq.sap_plan`; ``options``: :class:`~prunekit.vision.pq.SapOptions`) says how many to
    remove, the lowest-scored ones go (``scores(model, masks) -> {name: scores}``, magnitude by default: the paper's
    rule; scope global: one ranking over all layers, layer: each layer its own count) and the survivors are rewound
    to the weights of step ``rewind_step``. ``cap``: the most sparsity may reach. ``targets[r]`` is the sparsity
    round r reached (None before it runs); ``log`` one row per round (PQ index per layer, counts, sparsity)."""

    def __init__(self, rounds: int, options: SapOptions | None = None, scores=None, cap: float | None = None,
                 round_steps: int | None = None, rewind_step: int = 0, exclude: Sequence[str] = ()):
        if rounds < 1:
            raise PruneError(f"SAP needs at least 1 round; got {rounds}.")
        super().__init__(None, targets=[None] * rounds, round_steps=round_steps, rewind_step=rewind_step)
        self.options = options if options is not None else SapOptions()
        self.cap = None if cap is None else check_sparsity(cap, "sparsity cap")
        self.scores = scores or (lambda model, masks: score(model, "magnitude", list(masks), masks=masks))
        self.exclude = tuple(exclude)

    def next_round(self, model: nn.Module, step: int) -> Masks:
        from prunekit.core.allocate import keep_counts

        if self.rewinder.state is None:
            raise PruneError(f"The rewind step {self.rewind_step} is beyond the dense training; lower rewind_step.")
        cur = self.masks if self.masks is not None else Masks.dense(model, self.exclude)
        keep, row = sap_plan(model, cur, self.options, self.cap)
        s = self.scores(model, cur)
        if "*" in keep:  # global scope: the round's total shared out by one ranking over all layers
            keep = keep_counts(s, 1.0 - keep["*"] / cur.numel(), "global")
        self.masks = Masks.from_scores(s, keep)
        self.targets[self.round] = self.masks.sparsity()
        self.round += 1
        row.update(round=self.round, step=step, sparsity=self.masks.sparsity(),
                   layer_sparsity={k: 1.0 - v for k, v in self.masks.layer_density().items()})
        self.log.append(row)
        self.rewinder.rewind(model, self.masks)
        return self.masks
