"""Training-time pruning: the recipe (:class:`TrainPruneConfig`), training phases in the shared loop
(:func:`train_epochs`), and :func:`train_prune`, which runs one recipe's phases with its schedule.

Data is in :mod:`prunekit.vision.data`, the schedules as objects for any loop in :mod:`prunekit.vision.schedules`,
the run directory in :mod:`prunekit.vision.run`. The pieces (:func:`train_epochs`, :func:`evaluate`,
:func:`lottery`, ...) are public so a benchmark can share a dense model between methods.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.journey import Journey
from prunekit.errors import PruneError
from prunekit.core.allocate import ALLOCATIONS
from prunekit.vision.channels import CHANNEL_CRITERIA
from prunekit.vision.criteria import CRITERIA
from prunekit.core.loop import make_optimizer, make_schedule, train_loop
from prunekit.core.masks import Masks, prunable, weight_sparsity
from prunekit.vision.models import VISION_MODELS, build_model
from prunekit.vision.schedules import SCHEDULES, Gradual, Lottery, Rewinder, compute_masks, cubic_sparsity, lottery_sparsities  # noqa: F401

from prunekit.vision.data import DATASETS, FASHION_MEAN, FASHION_STD, batches_of, load_data  # noqa: F401
from prunekit.vision.run import load_run, save_run  # noqa: F401


class TrainPruneConfig(Config):
    """One training-time pruning run (the recipe of ``prunekit train-prune``)."""

    what = "train-prune"
    renamed = {"method": "criterion"}
    model: str = "cnn"
    dataset: Literal["fashion-mnist", "synthetic"] = "fashion-mnist"
    structure: Literal["weights", "channels"] = Field("weights", description="weights: unstructured masks; "
                                                      "channels: remove channels (the model shrinks)")
    criterion: str = Field("magnitude", description="weights: " + " | ".join(CRITERIA) + "; channels: "
                           + " | ".join(CHANNEL_CRITERIA))
    allocation: str | None = Field(None, description=" | ".join(ALLOCATIONS) + " (default: global for weights; "
                                   "channels: uniform = same ratio in every group, global = one ranking of "
                                   "normalized group scores over all groups)")
    min_density: float | None = Field(None, description="global / lamp: least fraction of weights each layer keeps (Global MP's floor)")
    schedule: str = Field("oneshot", description=" | ".join(SCHEDULES))
    sparsity: float = Field(0.9, description="weights: fraction of prunable weights zeroed; channels: fraction of "
                                              "each coupled channel group removed; sap: only a cap (its sparsity "
                                              "is adaptive)")
    epochs: int = Field(2, description="training epochs (oneshot/lottery/sap: per dense or per round; at-init/"
                                       "scratch/gradual: plus finetune_epochs)")
    finetune_epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    train_subset: int | None = Field(None, description="first N shuffled training images (None: all 60k)")
    test_subset: int | None = Field(None, description="first N test images (None: all 10k)")
    image_size: int | None = Field(None, description="resize images (EfficientNet-Lite0 default 64, RGB)")
    score_batches: int = Field(4, description="batches for SNIP / GraSP / Taylor scores and LRP's reference samples")
    synflow_iterations: int = 100
    gradual_start: float = Field(0.1, description="gradual: fraction of all steps where pruning starts")
    gradual_end: float = Field(0.7, description="gradual: fraction of all steps where the target is reached")
    prune_every: int = Field(25, description="gradual: steps between mask updates")
    rounds: int = Field(3, description="lottery / sap: pruning rounds")
    rewind_step: int = Field(50, description="lottery / sap: iteration whose weights survivors are rewound to")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of layers kept dense")
    bn_recalibrate: bool = Field(True, description="channels: re-estimate BatchNorm statistics on 20 training "
                                                   "batches after the last training phase")
    learn: str | None = Field(None, description="a learned method that trains what it removes (prunekit.vision.learn: "
                              "LEARNED); it runs its own schedule")
    options: dict = Field(default_factory=dict, description="the own options of the chosen learn / schedule / "
                          "criterion entries (each entry takes the keys its params define)")

    def option_owners(self) -> list:
        """(registry, name) of every chosen entry that may take options: learn, schedule, criterion."""
        owners = [(SCHEDULES, self.schedule), (CRITERIA if self.structure == "weights" else CHANNEL_CRITERIA,
                                               self.criterion)]
        if self.learn is not None:
            from prunekit.vision.learn import LEARNED

            owners.insert(0, (LEARNED, self.learn))
        return owners

    def options_for(self, registry, name: str):
        """The entry's params (a Config) filled from ``options`` (its own keys only), or None if it has none."""
        params = registry.get(name).params
        if params is None:
            return None
        return params.make(**{k: v for k, v in self.options.items() if k in params.model_fields})

    @model_validator(mode="after")
    def _check(self):
        if self.model not in VISION_MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(VISION_MODELS)}")
        if not (0.0 <= self.sparsity < 1.0):
            raise ValueError(f"target sparsity must be in [0, 1); got {self.sparsity}")
        self.schedule = SCHEDULES.canonical(self.schedule)
        if self.allocation is None:
            self.allocation = "uniform" if self.structure == "channels" else "global"
        if self.structure == "channels" and self.allocation not in ("uniform", "global"):
            raise ValueError("channel pruning takes allocation uniform or global")
        if self.allocation == "global-min":  # the spelling before the shared vocabulary
            import warnings

            warnings.warn("allocation 'global-min' is now 'global' with min_density (the per-layer floor); "
                          "'global-min' will be removed in the next release", FutureWarning, stacklevel=2)
            if self.min_density is None:
                raise ValueError("allocation global-min needs min_density")
            self.allocation = "global"
        if self.allocation == "list":
            raise ValueError("allocation list (a sparsity per layer) is for LLM pruning; use uniform, global, owl, lamp or erk")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        self.criterion = (CRITERIA if self.structure == "weights" else CHANNEL_CRITERIA).canonical(self.criterion)
        if self.structure == "channels" and self.schedule in ("gradual", "lottery", "sap"):
            raise ValueError("channel pruning supports the schedules oneshot, at-init (PreCropping) and scratch")
        if self.gradual_end <= self.gradual_start:
            raise ValueError(f"the schedule ends ({self.gradual_end}) before it starts ({self.gradual_start}); "
                             "make gradual_end larger than gradual_start")
        if not (0.0 <= self.gradual_start < 1.0 and 0.0 < self.gradual_end <= 1.0):
            raise ValueError("gradual_start and gradual_end are fractions of all training steps, in [0, 1]")
        if self.allocation == "global" and self.min_density is not None:
            if self.min_density > 1.0 - self.sparsity + 1e-12:
                raise ValueError(f"the per-layer minimum density {self.min_density} is above the target density "
                                 f"{1 - self.sparsity:.4g}; lower min_density or the sparsity")
        for k in ("batch_size", "score_batches", "synflow_iterations", "prune_every", "rounds"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for k in ("train_subset", "test_subset"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1 image")
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 8..1024 pixels, got {self.image_size}")
        if self.min_density is not None and not 0.0 <= self.min_density <= 1.0:
            raise ValueError(f"min_density must be in [0, 1], got {self.min_density}")
        if self.epochs < 0 or self.finetune_epochs < 0 or self.rewind_step < 0:
            raise ValueError("epochs, finetune_epochs and rewind_step must be >= 0")
        if self.schedule in ("lottery", "sap") and self.epochs < 1:
            raise ValueError(f"the {self.schedule} schedule trains epochs >= 1 per round")
        if self.schedule in ("at-init", "scratch", "gradual") and self.epochs + self.finetune_epochs < 1:
            raise ValueError(f"the {self.schedule} schedule needs epochs + finetune_epochs >= 1")
        if self.learn is not None:
            from prunekit.vision.learn import LEARNED

            self.learn = LEARNED.canonical(self.learn)
            if self.schedule != "oneshot":
                raise ValueError(f"learn {self.learn} runs its own schedule; drop schedule {self.schedule}")
        self._check_options()
        return self

    def _check_options(self) -> None:
        """Every key of ``options`` belongs to a chosen entry's params, and each entry's options validate."""
        from prunekit.errors import PruneError

        claimed: set[str] = set()
        filled: dict = {}
        for registry, name in self.option_owners():
            params = registry.get(name).params
            if params is None:
                continue
            claimed |= set(params.model_fields)
            try:
                filled.update(self.options_for(registry, name).model_dump())
            except PruneError as e:
                raise ValueError(str(e).rstrip(".")) from None
        extra = sorted(set(self.options) - claimed)
        if extra:
            chosen = ", ".join(f"{r.concept} {n}" for r, n in self.option_owners())
            raise ValueError(f"no chosen entry ({chosen}) takes the option {extra[0]!r}")
        self.options = filled


def make_config(**kw) -> TrainPruneConfig:
    """The config from keyword fields (None = default); a mistake is one sentence."""
    return TrainPruneConfig.make(**{k: v for k, v in kw.items() if v is not None})


# -- training -----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(1, len(y))


def train_epochs(model: nn.Module, data: dict, epochs: int, cfg: TrainPruneConfig, masks: Masks | None = None,
                 phase: str = "train", history: list | None = None, on_step=None, step0: int = 0,
                 total_steps: int | None = None, progress: bool = True, seed: int = 0,
                 journey: Journey | None = None, regularizer=None) -> int:
    """Train ``epochs`` epochs in the shared loop (:func:`prunekit.core.loop.train_loop`): SGD with Nesterov
    momentum, cosine learning rate over the phase, masks enforced. ``on_step(step) -> Masks | None`` may return new
    masks (gradual pruning); returns the last global step. ``history`` gets one row per epoch. ``journey`` gets
    every optimizer step at its live-parameter count (:meth:`Journey.tracking`: ``masks``, then the ones
    ``on_step`` hands back). ``regularizer(model) -> scalar tensor`` is added to every step's loss (the learned
    methods' penalties: polarization, nuclear norm, a FLOPs constraint)."""
    x, y = data["x_train"], data["y_train"]
    n = len(y)
    phase_steps = max(1, epochs * math.ceil(n / cfg.batch_size))
    opt = make_optimizer(model.parameters(), "sgd", cfg.lr, cfg.weight_decay, cfg.momentum)
    sched = make_schedule(opt, "cosine", phase_steps)
    g = torch.Generator().manual_seed(seed * 1000 + step0)
    tally = {"loss": 0.0, "ok": 0, "seen": 0}

    def epoch_batches():
        for _ in range(epochs):
            yield (idx for idx in torch.randperm(n, generator=g).split(cfg.batch_size))

    def loss_fn(model, idx):
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx])
        if regularizer is not None:
            loss = loss + regularizer(model)
        return loss, out

    def after_step(step, epoch, idx, out, loss):
        tally["loss"] += loss.item() * len(idx)
        tally["ok"] += int((out.argmax(1) == y[idx]).sum())
        tally["seen"] += len(idx)

    def on_epoch(epoch, step, res):
        seen = max(1, tally["seen"])
        if history is not None:
            history.append({"phase": phase, "epoch": epoch + 1, "step": step, "loss": tally["loss"] / seen,
                            "train_acc": tally["ok"] / seen,
                            "test_acc": evaluate(model, data["x_test"], data["y_test"]),
                            "sparsity": res.masks.sparsity() if res.masks is not None else 0.0})
        tally.update(loss=0.0, ok=0, seen=0)

    if journey is not None:
        on_step = journey.tracking(model, masks, on_step)
    res = train_loop(model, opt, epoch_batches(), loss_fn, scheduler=sched, masks=masks, on_step=on_step,
                     after_step=after_step, on_epoch=on_epoch, step0=step0, total=phase_steps, desc=phase,
                     progress=progress, postfix=lambda: {"acc": f"{tally['ok'] / max(1, tally['seen']):.3f}"})
    return res.step


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: dict, batches: int = 20, batch_size: int = 128, seed: int = 0) -> nn.Module:
    """Re-estimate BatchNorm running statistics as plain averages over ``batches`` training batches (weights
    untouched). Needed after channel removal or a short fine-tune of a network whose BatchNorm momentum is small
    (EfficientNet's 0.01): otherwise evaluation uses statistics of the network before pruning."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    was = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for x, _ in batches_of(data, batches, batch_size, seed):
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was)
    return model


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh random weights for every module that has ``reset_parameters`` (the "from scratch" control)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    return model


def _input_shape(data: dict) -> tuple[int, ...]:
    return tuple(data["x_train"].shape[1:])


def prune_once(model: nn.Module, data: dict, cfg: TrainPruneConfig, sparsity: float,
               masks: Masks | None = None) -> Masks:
    """Masks at ``sparsity`` by the recipe's criterion + allocation (scores on ``score_batches`` batches)."""
    needs = cfg.criterion in ("snip", "grasp", "taylor", "lrp") or cfg.allocation == "rd"  # rd: output distortion on inputs
    batches = batches_of(data, cfg.score_batches, cfg.batch_size, cfg.seed) if needs else None
    return compute_masks(model, sparsity, cfg.criterion, cfg.allocation, cfg.min_density, batches=batches, masks=masks,
                         seed=cfg.seed, input_shape=_input_shape(data), iterations=cfg.synflow_iterations,
                         exclude=cfg.exclude, options=_criterion_options(cfg, CRITERIA))


def _criterion_options(cfg: TrainPruneConfig, registry) -> dict | None:
    """The chosen criterion's own options (its params filled from the recipe's ``options``) as keyword arguments,
    or None when it has none (or is not an entry of ``registry``)."""
    if cfg.criterion not in registry:
        return None
    opts = cfg.options_for(registry, cfg.criterion)
    return None if opts is None else opts.model_dump()


def lottery(model: nn.Module, data: dict, cfg: TrainPruneConfig, targets: list[float], history: list | None = None,
            progress: bool = True, dense_trained: bool = False, rewinder: Rewinder | None = None,
            on_round=None, journey: Journey | None = None, schedule: Lottery | None = None) -> Masks:
    """Iterative magnitude pruning with rewinding (:class:`~prunekit.vision.schedules.Lottery`): (train,) then for
    each target: prune the survivors by the recipe's criterion/allocation to ``target``, rewind them to the weights
    of iteration ``rewind_step``, train ``epochs``. ``on_round(target, model, masks)`` is called after each round's
    training. ``journey`` counts every round's steps (:func:`train_epochs`). ``schedule``: another round schedule
    (:class:`~prunekit.vision.schedules.Sap`, whose ``targets[r]`` is what round r reached) instead of ``targets``."""
    sched = schedule if schedule is not None else Lottery(lambda m, sp, k: prune_once(m, data, cfg, sp, k),
                                                          targets=targets, rewind_step=cfg.rewind_step)
    if dense_trained:
        sched.rewinder = rewinder or Rewinder()
    else:
        if cfg.rewind_step == 0:
            sched.rewinder.save(model, 0)

        def save_early(step):
            sched.save_early(step, model)
            return None

        train_epochs(model, data, cfg.epochs, cfg, None, "dense", history, on_step=save_early, progress=progress,
                     seed=cfg.seed, journey=journey)
    masks = None
    for r in range(len(sched.targets)):
        masks = sched.next_round(model, sched.rewinder.step if sched.rewinder.step is not None else 0)
        target = sched.targets[r]
        train_epochs(model, data, cfg.epochs, cfg, masks, f"round {r + 1} ({target:.1%})", history,
                     step0=sched.rewinder.step, progress=progress, seed=cfg.seed + r + 1, journey=journey)
        if on_round is not None:
            on_round(target, model, masks)
    return masks


def train_prune(cfg: TrainPruneConfig, progress: bool = True, model: nn.Module | None = None,
                data: dict | None = None) -> tuple[nn.Module, Masks | None, dict]:
    """Run one recipe. Returns (model, masks or None for channels, {"history", "metrics", "journey",
    "channels"?}); ``journey`` is :meth:`Journey.summary` over every optimizer step of every phase."""
    torch.manual_seed(cfg.seed)
    effnet = cfg.model == "efficientnet-lite0"
    if data is None:
        data = load_data(cfg.dataset, cfg.train_subset, cfg.test_subset, cfg.seed,
                         cfg.image_size or (64 if effnet else None), rgb=effnet)
    if model is None:
        model = build_model(cfg.model, num_classes=10)
    init_state = copy.deepcopy(model.state_dict())
    hist: list = []
    info: dict = {"history": hist}
    journey = Journey()
    t0 = time.perf_counter()
    masks: Masks | None = None
    if cfg.learn is not None:
        from prunekit.vision.learn import LEARNED, LearnContext

        ctx = LearnContext(journey, hist, info, cfg.options_for(LEARNED, cfg.learn), progress)
        model, masks = LEARNED.get(cfg.learn).impl(cfg, model, data, ctx)
    elif cfg.structure == "channels":
        from prunekit.vision.channels import precrop_ratios, prune_channels

        example = data["x_train"][:2]
        ignore_dense = [n for n in cfg.exclude]
        from prunekit.vision.channels import check_supported, output_modules

        mods = dict(model.named_modules())
        bad = [n for n in ignore_dense if n not in mods]
        if bad:
            raise PruneError(f"No module named {bad[0]!r} in the model; --exclude takes module names.")
        check_supported(model, output_modules(model.eval(), example) + [mods[n] for n in ignore_dense])
        if cfg.schedule in ("oneshot", "scratch"):
            if cfg.epochs > 0:
                train_epochs(model, data, cfg.epochs, cfg, None, "dense", hist, progress=progress, seed=cfg.seed,
                             journey=journey)
            info["dense_acc"] = evaluate(model, data["x_test"], data["y_test"])
            batches = batches_of(data, cfg.score_batches, cfg.batch_size, cfg.seed)
            info["channels"] = prune_channels(model, example, cfg.sparsity, cfg.criterion, ignore=ignore_dense, batches=batches,
                                              global_pruning=cfg.allocation == "global",
                                              options=_criterion_options(cfg, CHANNEL_CRITERIA))
            if cfg.schedule == "scratch":
                reinitialize(model, cfg.seed + 1)
                train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, None, "scratch", hist,
                             progress=progress, seed=cfg.seed + 1, journey=journey)
            else:
                train_epochs(model, data, cfg.finetune_epochs, cfg, None, "finetune", hist, progress=progress,
                             seed=cfg.seed + 1, journey=journey)
        else:  # at-init: PreCropping
            m = prune_once(model, data, cfg.model_copy(update={"allocation": cfg.allocation}), cfg.sparsity)
            ratios = precrop_ratios(model, m.layer_density())
            keep_out = set()
            from prunekit.vision.channels import output_modules

            names = {mod: n for n, mod in model.named_modules()}
            keep_out = {names[mo] for mo in output_modules(model, example)}
            ratios = {k: v for k, v in ratios.items() if k not in keep_out and k not in ignore_dense}
            info["precrop_ratios"] = ratios
            info["channels"] = prune_channels(model, example, 0.0, "magnitude", ratio_dict=ratios, ignore=ignore_dense)
            train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, None, "train", hist, progress=progress,
                         seed=cfg.seed, journey=journey)
        if cfg.bn_recalibrate:
            recalibrate_bn(model, data, 20, cfg.batch_size, cfg.seed)
    elif cfg.schedule == "oneshot":
        train_epochs(model, data, cfg.epochs, cfg, None, "dense", hist, progress=progress, seed=cfg.seed,
                     journey=journey)
        info["dense_acc"] = evaluate(model, data["x_test"], data["y_test"])
        masks = prune_once(model, data, cfg, cfg.sparsity)
        masks.apply(model)
        info["acc_after_prune"] = evaluate(model, data["x_test"], data["y_test"])
        train_epochs(model, data, cfg.finetune_epochs, cfg, masks, "finetune", hist, progress=progress,
                     seed=cfg.seed + 1, journey=journey)
    elif cfg.schedule == "at-init":
        masks = prune_once(model, data, cfg, cfg.sparsity)
        masks.apply(model)
        train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, masks, "train", hist, progress=progress,
                     seed=cfg.seed, journey=journey)
    elif cfg.schedule == "scratch":
        train_epochs(model, data, cfg.epochs, cfg, None, "dense", hist, progress=progress, seed=cfg.seed,
                     journey=journey)
        info["dense_acc"] = evaluate(model, data["x_test"], data["y_test"])
        masks = prune_once(model, data, cfg, cfg.sparsity)
        reinitialize(model, cfg.seed + 1)
        masks.apply(model)
        train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, masks, "scratch", hist, progress=progress,
                     seed=cfg.seed + 1, journey=journey)
    elif cfg.schedule == "gradual":
        per_epoch = math.ceil(len(data["y_train"]) / cfg.batch_size)
        total = (cfg.epochs + cfg.finetune_epochs) * per_epoch
        start, end = int(cfg.gradual_start * total), max(int(cfg.gradual_start * total) + 1, int(cfg.gradual_end * total))
        sched = Gradual(lambda m, sp, k: prune_once(m, data, cfg, sp, k), cfg.sparsity, start, end, cfg.prune_every)
        train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, None, "gradual", hist,
                     on_step=lambda step: sched.on_step(step, model), total_steps=total, progress=progress,
                     seed=cfg.seed, journey=journey)
        masks = sched.masks
        sparsities = sched.log
        info["gradual"] = {"start": start, "end": end, "every": cfg.prune_every, "steps": sparsities}
    elif cfg.schedule == "lottery":
        targets = lottery_sparsities(cfg.sparsity, cfg.rounds)
        rounds = []
        masks = lottery(model, data, cfg, targets, hist, progress, journey=journey,
                        on_round=lambda t, m, k: rounds.append({"target": t, "sparsity": k.sparsity(),
                                                                "test_acc": evaluate(m, data["x_test"], data["y_test"])}))
        info["rounds"] = rounds
    elif cfg.schedule == "sap":  # lottery's rounds, each round's amount from the PQ index (prunekit.vision.pq)
        from prunekit.vision.criteria import score
        from prunekit.vision.pq import layer_pq
        from prunekit.vision.schedules import Sap

        opts = cfg.options_for(SCHEDULES, "sap")
        batches = (batches_of(data, cfg.score_batches, cfg.batch_size, cfg.seed)
                   if cfg.criterion in ("snip", "grasp", "taylor", "lrp") else None)
        copts = _criterion_options(cfg, CRITERIA)
        sched = Sap(cfg.rounds, opts, cap=cfg.sparsity, rewind_step=cfg.rewind_step, exclude=cfg.exclude,
                    scores=lambda m, k: score(m, cfg.criterion, list(k), batches=batches, masks=k, seed=cfg.seed,
                                              input_shape=_input_shape(data), options=copts))
        accs: list = []
        masks = lottery(model, data, cfg, [], hist, progress, journey=journey, schedule=sched,
                        on_round=lambda t, m, k: accs.append(evaluate(m, data["x_test"], data["y_test"])))
        info["sap"] = {**opts.model_dump(), "cap": cfg.sparsity, "final_pq": layer_pq(model, masks, opts.p, opts.q),
                       "rounds": [{**row, "test_acc": a} for row, a in zip(sched.log, accs)]}
    info["seconds"] = time.perf_counter() - t0
    info["journey"] = journey.summary()
    acc = evaluate(model, data["x_test"], data["y_test"])
    names = list(masks) if masks is not None else list(prunable(model))
    info["metrics"] = {"test_acc": acc, "test_images": int(len(data["y_test"])),
                       "train_images": int(len(data["y_train"])),
                       "sparsity": masks.sparsity() if masks is not None else 0.0,
                       "weight_zeros": weight_sparsity(model, names),
                       "params": sum(p.numel() for p in model.parameters())}
    info["init_params"] = sum(v.numel() for k, v in init_state.items())
    return model, masks, info
