"""Training with masks: data, the training loop, every schedule, and the run directory.

The pieces (:func:`load_data`, :func:`train_epochs`, :func:`evaluate`, :func:`lottery`, ...) are public so a
benchmark can share a dense model between methods; :func:`train_prune` runs one whole recipe, and
:func:`save_run` / :func:`load_run` write and read a run directory (``model.safetensors`` + ``prunekit.json`` +
``curves.json`` + ``curves.png``), atomically and without pickle.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.errors import PruneError
from prunekit.core.allocate import ALLOCATIONS
from prunekit.vision.channels import CHANNEL_CRITERIA
from prunekit.vision.criteria import CRITERIA
from prunekit.core.masks import Masks, check_sparsity, prunable, weight_sparsity
from prunekit.vision.models import VISION_MODELS, build_model
from prunekit.vision.schedules import SCHEDULES, Rewinder, compute_masks, cubic_sparsity, lottery_sparsities

DATASETS = ("fashion-mnist", "synthetic")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


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
                                              "each coupled channel group removed")
    epochs: int = Field(2, description="training epochs (oneshot/lottery: per dense or per round; at-init/"
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
    score_batches: int = Field(4, description="batches for SNIP / GraSP / Taylor scores")
    synflow_iterations: int = 100
    gradual_start: float = Field(0.1, description="gradual: fraction of all steps where pruning starts")
    gradual_end: float = Field(0.7, description="gradual: fraction of all steps where the target is reached")
    prune_every: int = Field(25, description="gradual: steps between mask updates")
    rounds: int = Field(3, description="lottery: pruning rounds")
    rewind_step: int = Field(50, description="lottery: iteration whose weights survivors are rewound to")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of layers kept dense")
    bn_recalibrate: bool = Field(True, description="channels: re-estimate BatchNorm statistics on 20 training "
                                                   "batches after the last training phase")

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
        if self.structure == "channels" and self.schedule in ("gradual", "lottery"):
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
        if self.schedule == "lottery" and self.epochs < 1:
            raise ValueError("the lottery schedule trains epochs >= 1 per round")
        if self.schedule in ("at-init", "scratch", "gradual") and self.epochs + self.finetune_epochs < 1:
            raise ValueError(f"the {self.schedule} schedule needs epochs + finetune_epochs >= 1")
        return self


def make_config(**kw) -> TrainPruneConfig:
    """The config from keyword fields (None = default); a mistake is one sentence."""
    return TrainPruneConfig.make(**{k: v for k, v in kw.items() if v is not None})


# -- data ---------------------------------------------------------------------------------------------------

def load_data(dataset: str = "fashion-mnist", train_subset: int | None = None, test_subset: int | None = None,
              seed: int = 0, image_size: int | None = None, rgb: bool = False) -> dict:
    """Normalized float tensors {x_train, y_train, x_test, y_test}; ``synthetic`` is a tiny learnable task for
    tests (random images, labels from a fixed random linear map)."""
    g = torch.Generator().manual_seed(seed)
    if dataset == "fashion-mnist":
        from prunekit.zoo.images import fashion_mnist

        xtr, ytr = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
        perm = torch.randperm(len(xtr), generator=g)
        if train_subset:
            perm = perm[:train_subset]
        xtr, ytr = xtr[perm], ytr[perm]
        if test_subset:
            xte, yte = xte[:test_subset], yte[:test_subset]
        xtr = ((xtr.float() / 255 - FASHION_MEAN) / FASHION_STD)[:, None]
        xte = ((xte.float() / 255 - FASHION_MEAN) / FASHION_STD)[:, None]
    elif dataset == "synthetic":
        n_tr, n_te = train_subset or 512, test_subset or 256
        protos = torch.randn(10, 1, 7, 7, generator=torch.Generator().manual_seed(1234))
        protos = F.interpolate(protos, size=(28, 28), mode="bilinear", align_corners=False)
        ytr = torch.randint(0, 10, (n_tr,), generator=g)
        yte = torch.randint(0, 10, (n_te,), generator=g)
        xtr = protos[ytr] + 0.8 * torch.randn(n_tr, 1, 28, 28, generator=g)
        xte = protos[yte] + 0.8 * torch.randn(n_te, 1, 28, 28, generator=g)
    else:
        raise PruneError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    if image_size and image_size != xtr.shape[-1]:
        xtr = F.interpolate(xtr, size=(image_size, image_size), mode="bilinear", align_corners=False)
        xte = F.interpolate(xte, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if rgb:
        xtr, xte = xtr.expand(-1, 3, -1, -1).contiguous(), xte.expand(-1, 3, -1, -1).contiguous()
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def batches_of(data: dict, n: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 7)
    idx = torch.randperm(len(data["y_train"]), generator=g)[: n * batch_size]
    return [(data["x_train"][i], data["y_train"][i]) for i in idx.split(batch_size)]


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


def _optimizer(model, cfg: TrainPruneConfig):
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=True)


def train_epochs(model: nn.Module, data: dict, epochs: int, cfg: TrainPruneConfig, masks: Masks | None = None,
                 phase: str = "train", history: list | None = None, on_step=None, step0: int = 0,
                 total_steps: int | None = None, progress: bool = True, seed: int = 0) -> int:
    """Train ``epochs`` epochs with SGD (Nesterov, cosine learning rate over the phase), masks enforced.
    ``on_step(step) -> Masks | None`` may return new masks (gradual pruning); returns the last global step."""
    from tqdm import tqdm

    x, y = data["x_train"], data["y_train"]
    n = len(y)
    per_epoch = math.ceil(n / cfg.batch_size)
    phase_steps = max(1, epochs * per_epoch)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, phase_steps) / phase_steps)))
    if masks is not None:
        masks.attach(model, opt)
    g = torch.Generator().manual_seed(seed * 1000 + step0)
    step = step0
    model.train()
    bar = tqdm(total=phase_steps, desc=phase, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for ep in range(epochs):
            perm = torch.randperm(n, generator=g)
            tot_loss = tot_ok = seen = 0
            for idx in perm.split(cfg.batch_size):
                if on_step is not None:
                    new = on_step(step)
                    if new is not None:
                        if masks is not None:
                            masks.detach()
                        masks = new
                        masks.attach(model, opt)
                xb, yb = x[idx], y[idx]
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                tot_loss += loss.item() * len(yb)
                tot_ok += int((out.argmax(1) == yb).sum())
                seen += len(yb)
                sp = masks.sparsity() if masks is not None else 0.0
                bar.update(1)
                bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{tot_ok / seen:.3f}", sparsity=f"{sp:.3f}")
            if history is not None:
                history.append({"phase": phase, "epoch": ep + 1, "step": step, "loss": tot_loss / max(1, seen),
                                "train_acc": tot_ok / max(1, seen),
                                "test_acc": evaluate(model, data["x_test"], data["y_test"]),
                                "sparsity": masks.sparsity() if masks is not None else 0.0})
    finally:
        bar.close()
        if masks is not None:
            masks.detach()
            masks.apply(model)
    return step


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
    batches = batches_of(data, cfg.score_batches, cfg.batch_size, cfg.seed) if cfg.criterion in ("snip", "grasp", "taylor") else None
    return compute_masks(model, sparsity, cfg.criterion, cfg.allocation, cfg.min_density, batches=batches, masks=masks,
                         seed=cfg.seed, input_shape=_input_shape(data), iterations=cfg.synflow_iterations,
                         exclude=cfg.exclude)


def lottery(model: nn.Module, data: dict, cfg: TrainPruneConfig, targets: list[float], history: list | None = None,
            progress: bool = True, dense_trained: bool = False, rewinder: Rewinder | None = None,
            on_round=None) -> Masks:
    """Iterative magnitude pruning with rewinding: (train,) then for each target: prune the survivors by the
    recipe's criterion/allocation to ``target``, rewind them to the weights of iteration ``rewind_step``, train
    ``epochs``. ``on_round(target, model, masks)`` is called after each round's training."""
    if not dense_trained:
        rewinder = Rewinder()
        if cfg.rewind_step == 0:
            rewinder.save(model, 0)

        def save_early(step):
            if step == cfg.rewind_step and rewinder.state is None:
                rewinder.save(model, step)
            return None

        train_epochs(model, data, cfg.epochs, cfg, None, "dense", history, on_step=save_early, progress=progress,
                     seed=cfg.seed)
    if rewinder is None or rewinder.state is None:
        raise PruneError(f"The rewind step {cfg.rewind_step} is beyond the dense training; lower rewind_step.")
    masks = None
    for r, target in enumerate(targets):
        masks = prune_once(model, data, cfg, target, masks)
        rewinder.rewind(model, masks)
        train_epochs(model, data, cfg.epochs, cfg, masks, f"round {r + 1} ({target:.1%})", history,
                     step0=rewinder.step, progress=progress, seed=cfg.seed + r + 1)
        if on_round is not None:
            on_round(target, model, masks)
    return masks


def train_prune(cfg: TrainPruneConfig, progress: bool = True, model: nn.Module | None = None,
                data: dict | None = None) -> tuple[nn.Module, Masks | None, dict]:
    """Run one recipe. Returns (model, masks or None for channels, {"history", "metrics", "channels"?})."""
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
    t0 = time.perf_counter()
    masks: Masks | None = None
    if cfg.structure == "channels":
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
                train_epochs(model, data, cfg.epochs, cfg, None, "dense", hist, progress=progress, seed=cfg.seed)
            info["dense_acc"] = evaluate(model, data["x_test"], data["y_test"])
            batches = batches_of(data, cfg.score_batches, cfg.batch_size, cfg.seed)
            info["channels"] = prune_channels(model, example, cfg.sparsity, cfg.criterion, ignore=ignore_dense, batches=batches,
                                              global_pruning=cfg.allocation == "global")
            if cfg.schedule == "scratch":
                reinitialize(model, cfg.seed + 1)
                train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, None, "scratch", hist,
                             progress=progress, seed=cfg.seed + 1)
            else:
                train_epochs(model, data, cfg.finetune_epochs, cfg, None, "finetune", hist, progress=progress,
                             seed=cfg.seed + 1)
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
                         seed=cfg.seed)
        if cfg.bn_recalibrate:
            recalibrate_bn(model, data, 20, cfg.batch_size, cfg.seed)
    elif cfg.schedule == "oneshot":
        train_epochs(model, data, cfg.epochs, cfg, None, "dense", hist, progress=progress, seed=cfg.seed)
        info["dense_acc"] = evaluate(model, data["x_test"], data["y_test"])
        masks = prune_once(model, data, cfg, cfg.sparsity)
        masks.apply(model)
        info["acc_after_prune"] = evaluate(model, data["x_test"], data["y_test"])
        train_epochs(model, data, cfg.finetune_epochs, cfg, masks, "finetune", hist, progress=progress, seed=cfg.seed + 1)
    elif cfg.schedule == "at-init":
        masks = prune_once(model, data, cfg, cfg.sparsity)
        masks.apply(model)
        train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, masks, "train", hist, progress=progress,
                     seed=cfg.seed)
    elif cfg.schedule == "scratch":
        train_epochs(model, data, cfg.epochs, cfg, None, "dense", hist, progress=progress, seed=cfg.seed)
        info["dense_acc"] = evaluate(model, data["x_test"], data["y_test"])
        masks = prune_once(model, data, cfg, cfg.sparsity)
        reinitialize(model, cfg.seed + 1)
        masks.apply(model)
        train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, masks, "scratch", hist, progress=progress,
                     seed=cfg.seed + 1)
    elif cfg.schedule == "gradual":
        per_epoch = math.ceil(len(data["y_train"]) / cfg.batch_size)
        total = (cfg.epochs + cfg.finetune_epochs) * per_epoch
        start, end = int(cfg.gradual_start * total), max(int(cfg.gradual_start * total) + 1, int(cfg.gradual_end * total))
        state = {"masks": None, "last": None}
        sparsities = []

        def on_step(step):
            if step < start or (step - start) % cfg.prune_every and step != end:
                return None
            s = cubic_sparsity(step, start, end, cfg.sparsity, 0.0, cfg.prune_every) if step < end else cfg.sparsity
            if state["last"] is not None and abs(s - state["last"]) < 1e-12:
                return None
            state["last"] = s
            state["masks"] = prune_once(model, data, cfg, s, state["masks"])
            sparsities.append({"step": step, "target": s, "sparsity": state["masks"].sparsity()})
            return state["masks"]

        train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, None, "gradual", hist, on_step=on_step,
                     total_steps=total, progress=progress, seed=cfg.seed)
        masks = state["masks"]
        info["gradual"] = {"start": start, "end": end, "every": cfg.prune_every, "steps": sparsities}
    elif cfg.schedule == "lottery":
        targets = lottery_sparsities(cfg.sparsity, cfg.rounds)
        rounds = []
        masks = lottery(model, data, cfg, targets, hist, progress,
                        on_round=lambda t, m, k: rounds.append({"target": t, "sparsity": k.sparsity(),
                                                                "test_acc": evaluate(m, data["x_test"], data["y_test"])}))
        info["rounds"] = rounds
    info["seconds"] = time.perf_counter() - t0
    acc = evaluate(model, data["x_test"], data["y_test"])
    names = list(masks) if masks is not None else list(prunable(model))
    info["metrics"] = {"test_acc": acc, "test_images": int(len(data["y_test"])),
                       "train_images": int(len(data["y_train"])),
                       "sparsity": masks.sparsity() if masks is not None else 0.0,
                       "weight_zeros": weight_sparsity(model, names),
                       "params": sum(p.numel() for p in model.parameters())}
    info["init_params"] = sum(v.numel() for k, v in init_state.items())
    return model, masks, info


# -- run directory --------------------------------------------------------------------------------------------

def save_run(out: str | Path, model: nn.Module, cfg: TrainPruneConfig, masks: Masks | None, info: dict,
             overwrite: bool = False) -> Path:
    """Write ``out`` atomically: model.safetensors (weights, and masks as uint8 ``mask::<name>`` tensors),
    prunekit.json (recipe, metrics, tensor shapes for rebuilding), curves.json, curves.png."""
    from safetensors.torch import save_file

    from prunekit.io import atomic_dir, check_output, dumps

    out = check_output(out, overwrite)
    with atomic_dir(out) as tmp:
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if masks is not None:
            tensors.update(masks.state())
        save_file(tensors, str(tmp / "model.safetensors"))
        from prunekit.vision.channels import shapes_of

        manifest = {"kind": "prunekit-vision", "recipe": cfg.model_dump(), "metrics": info.get("metrics"),
                    "shapes": shapes_of(model), "channels": info.get("channels"),
                    "versions": {"torch": torch.__version__}}
        for k in ("dense_acc", "acc_after_prune", "rounds", "gradual", "precrop_ratios", "seconds"):
            if k in info:
                manifest[k] = info[k]
        (tmp / "prunekit.json").write_text(dumps(manifest))
        (tmp / "curves.json").write_text(dumps(info.get("history", [])))
        _plot_curves(info.get("history", []), tmp / "curves.png", f"{cfg.model} {cfg.criterion}/{cfg.allocation} {cfg.schedule}")
    return out


def _plot_curves(history: list, path: Path, title: str) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    xs = list(range(1, len(history) + 1))
    ax[0].plot(xs, [h["test_acc"] for h in history], "o-", label="test accuracy")
    ax[0].plot(xs, [h["train_acc"] for h in history], "s--", label="train accuracy")
    ax[0].set_xlabel("epoch (all phases)")
    ax[0].legend()
    ax[1].plot(xs, [h["sparsity"] for h in history], "o-", color="C3")
    ax[1].set_ylabel("sparsity")
    ax[1].set_xlabel("epoch (all phases)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_run(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, Masks | None, dict]:
    """Rebuild a saved run: the zoo model named in the manifest (or ``model``, the same architecture a user
    passed), resized to the saved shapes, weights loaded strictly; masks if saved."""
    from safetensors.torch import load_file

    from prunekit.vision.channels import rebuild

    path = Path(path)
    if not (path / "prunekit.json").is_file() or not (path / "model.safetensors").is_file():
        raise PruneError(f"{path} is not a prunekit vision run (no prunekit.json / model.safetensors).")
    manifest = json.loads((path / "prunekit.json").read_text())
    if model is None:
        model = build_model(manifest["recipe"]["model"], num_classes=10, pretrained=False)
    rebuild(model, manifest["shapes"])
    sd = load_file(str(path / "model.safetensors"))
    masks = Masks.from_state(sd) if any(k.startswith("mask::") for k in sd) else None
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("mask::")}, strict=True)
    return model.eval(), masks, manifest
