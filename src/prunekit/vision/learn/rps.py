"""Random parameter sharing (ROAST / STABLE-RPS: Desai & Shrivastava, "ROAST: Efficient model compression with
random operation access specific tile hashing", 2022; "In defense of parameter sharing for model compression",
ICLR 2024): learner ``rps``.

Every prunable weight (conv / linear / attention projections: :func:`prunekit.core.masks.prunable`, outside
``exclude``) is drawn from ONE shared array ``z`` of the budgeted
size ``m = round((1 - sparsity) x N)`` (N: the prunable weight count)::

    w_l[i] = g_l * s_l(i) * z[h_l(i)]

with a seeded hash ``h_l`` per layer (ROAST: the layer's flat weight is cut into chunks of ``chunk`` consecutive
entries and each chunk goes to a random offset of ``z``, so the chunk reads ``z[o : o + chunk]``; ``chunk: 1`` is
a plain per-entry hash), a random sign ``s_l(i)`` in {-1, +1}, and ROAST's fixed per-layer scale ``g_l`` (the std
of the layer's initial weights, so one ``z`` of unit scale serves layers of different scales). ``mapping:
identity`` lays the layers one after the other into ``z`` with sign +1 (needs ``m = N``, sparsity 0): any dense
model is then reproduced exactly. ``z`` is the only trained weight of those layers: the gradient of ``z[j]`` sums
the gradients of every weight mapped to it times its sign and ``g_l``; with ``grad_scale`` (STABLE-RPS's gradient
scaling) layer l's contribution is divided by ``g_l`` instead, so a step moves each weight as far as dense SGD would
(the true gradient scales layer l's step by ``g_l^2``, which stalls layers of small scale).

The model's own forward is untouched: each shared parameter's slot is emptied (None) and the weight is recomputed
from ``z`` for every call (a forward pre-hook on the module that reads it, dropped by a forward hook). ``z`` and the scales are saved as ``rps.weight`` / ``rps.scale`` in the run;
the hashes are regenerated from ``hash_seed`` by :func:`rebuild` (the entry's ``rebuild`` meta for ``load_run``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED


class RpsOptions(Config):
    """The options of learner ``rps`` (recipe ``options``, ``--option KEY=VALUE``)."""

    what = "rps option"
    mapping: Literal["hash", "identity"] = Field("hash", description="hash: seeded random chunks and signs (ROAST); "
                                                 "identity: layers laid out one after the other, sign +1 (needs "
                                                 "sparsity 0)")
    chunk: int = Field(32, description="hash: consecutive weights mapped together to a random offset of z (ROAST's "
                       "tile); 1: a plain per-entry hash")
    hash_seed: int | None = Field(None, description="seed of the hashes and signs (default: the recipe's seed)")
    init: Literal["random", "fit"] = Field("random", description="random: z ~ N(0, 1) (training from scratch); fit: "
                                           "z = the least-squares fit of the model's current weights")
    grad_scale: bool = Field(True, description="STABLE-RPS: layer l's gradient into z is s dL/dw / g_l (not the "
                             "true s g_l dL/dw), so each weight steps as in dense SGD")

    @model_validator(mode="after")
    def _check(self):
        if self.chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {self.chunk}")
        if self.hash_seed is not None and self.hash_seed < 0:
            raise ValueError(f"hash_seed must be >= 0, got {self.hash_seed}")
        return self


def layer_map(n: int, budget: int, seed: int, layer: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into z, sign) of each of a layer's ``n`` flat weights: chunks of ``chunk`` consecutive weights go to
    uniform random offsets o in [0, budget - chunk] and read z[o], z[o + 1], ...; signs uniform in {-1, +1}. Seeded
    by (``seed``, ``layer``) only, so the same call rebuilds the same map."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    c = min(chunk, budget)
    chunks = math.ceil(n / c)
    offsets = torch.randint(0, budget - c + 1, (chunks,), generator=g)
    idx = (offsets[:, None] + torch.arange(c)[None, :]).reshape(-1)[:n]
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return idx, sign


class SharedWeights(nn.Linear):
    """The shared array ``z`` (its ``weight`` parameter, [1, budget] as a Linear(budget -> 1), so that it is the model's one prunable tensor in
    :func:`prunekit.core.masks.prunable` and in the run's layer list), the per-layer scales (buffer) and each
    layer's map (non-persistent buffers, rebuilt from the seed); :meth:`draw` gives layer k's weight. A ``Linear``
    only by type: it is never called."""

    def __init__(self, shapes: list[tuple[int, ...]], budget: int, mapping: str = "hash", chunk: int = 32,
                 seed: int = 0, grad_scale: bool = True):
        nn.Module.__init__(self)
        total = sum(math.prod(s) for s in shapes)
        if mapping == "identity" and budget != total:
            raise PruneError(f"mapping identity needs the full budget ({total} weights, sparsity 0); got {budget}.")
        self.in_features, self.out_features = budget, 1
        self.shapes, self.grad_scale = [tuple(s) for s in shapes], grad_scale
        self.weight = nn.Parameter(torch.zeros(1, budget))
        self.register_parameter("bias", None)
        self.register_buffer("scale", torch.ones(len(shapes)))
        start = 0
        for k, s in enumerate(self.shapes):
            n = math.prod(s)
            if mapping == "identity":
                idx, sign = torch.arange(start, start + n), torch.ones(n)
            else:
                idx, sign = layer_map(n, budget, seed, k, chunk)
            start += n
            self.register_buffer(f"idx{k}", idx, persistent=False)
            self.register_buffer(f"sign{k}", sign, persistent=False)

    @property
    def z(self) -> torch.Tensor:
        """The shared array, flat (a view of ``weight``)."""
        return self.weight.view(-1)

    def forward(self, x):
        raise RuntimeError("SharedWeights holds the shared array; its layers draw from it, it is not called")

    def extra_repr(self) -> str:
        return f"budget={self.in_features}, layers={len(self.shapes)}, grad_scale={self.grad_scale}"

    def draw(self, k: int) -> torch.Tensor:
        """Layer k's weight g_k * s * z[h]. Its gradient into z: the true one (s g_k dL/dw), or with ``grad_scale``
        s dL/dw / g_k, so that an SGD step moves w by -lr x the summed dL/dw of its bucket, as dense training
        would (the true gradient moves it by g_k^2 times that)."""
        zi = self.z[getattr(self, f"idx{k}")]
        g = self.scale[k]
        w = g * zi.detach() + (zi - zi.detach()) / g if self.grad_scale else g * zi
        return (getattr(self, f"sign{k}") * w).view(self.shapes[k])

    @torch.no_grad()
    def fit(self, weights: list[torch.Tensor]) -> None:
        """z = argmin sum_l sum_i (g_l s_i z[h(i)] - w_l[i])^2: each z[j] is sum g s w / sum g^2 over the weights
        mapped to it (0 where none is); exact when every entry of z has one weight (identity mapping)."""
        num, den = torch.zeros_like(self.z), torch.zeros_like(self.z)
        for k, w in enumerate(weights):
            idx, g = getattr(self, f"idx{k}"), self.scale[k]
            num.index_add_(0, idx, g * getattr(self, f"sign{k}") * w.reshape(-1).to(num.dtype))
            den.index_add_(0, idx, torch.full((idx.numel(),), float(g * g)))
        self.z.copy_(torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)))


class _Draw:
    """Forward pre-hook: for the call, each target's weight (module, attribute name, layer k) is the one drawn from
    ``z`` (an instance attribute over the module's ``None`` parameter slot)."""

    def __init__(self, owner: SharedWeights, targets: list[tuple[nn.Module, str, int]]):
        self.owner, self.targets = owner, targets

    def __call__(self, module: nn.Module, args) -> None:
        for mod, attr, k in self.targets:
            mod.__dict__[attr] = self.owner.draw(k)


class _Release:
    """Forward hook: drop the drawn weights (no autograd graph held between calls; they read None again)."""

    def __init__(self, targets: list[tuple[nn.Module, str, int]]):
        self.targets = targets

    def __call__(self, module: nn.Module, args, output) -> None:
        for mod, attr, _ in self.targets:
            mod.__dict__.pop(attr, None)


class _EmptyOnLoad:
    """Load-state-dict pre-hook of the root (:func:`rebuild`): empty the shared parameters' slots when the saved run
    is loaded (until then they keep the fresh model's tensors, whose shapes ``channels.rebuild`` reads)."""

    def __init__(self, targets: list[tuple[nn.Module, str, int]]):
        self.targets = targets

    def __call__(self, module, state_dict, prefix, *rest) -> None:
        for mod, attr, _ in self.targets:
            mod._parameters[attr] = None


def attach(model: nn.Module, names: list[str], budget: int, mapping: str = "hash", chunk: int = 32, seed: int = 0,
           grad_scale: bool = True, scales: list[float] | None = None, on_load: bool = False) -> SharedWeights:
    """Replace each named parameter (e.g. ``features.0.weight``) by a weight drawn from one shared array of
    ``budget`` entries (``model.rps``, saved as ``rps.weight``) at each call of the module that reads it (its own
    module; for an attention's ``out_proj`` the ``MultiheadAttention``, whose forward reads it). ``scales``: the
    per-layer g_l (default: the std of each current weight). The shared array starts at 0 (see
    :meth:`SharedWeights.fit`). ``on_load``: the parameter slots are emptied only when a state dict is loaded."""
    mods = dict(model.named_modules())
    where = [n.rsplit(".", 1) if "." in n else ("", n) for n in names]
    current = [getattr(mods[m], a).detach().clone() for m, a in where]
    shared = SharedWeights([tuple(w.shape) for w in current], budget, mapping, chunk, seed, grad_scale)
    with torch.no_grad():
        shared.scale.copy_(torch.tensor(scales) if scales is not None else
                           torch.stack([w.float().std().clamp_min(1e-8) if w.numel() > 1 else torch.ones(())
                                        for w in current]))
    model.rps = shared
    readers: dict[str, list] = {}
    for k, (m, a) in enumerate(where):
        reader = m
        parent = m.rsplit(".", 1)[0] if "." in m else ""
        if m and isinstance(mods.get(parent), nn.MultiheadAttention):
            reader = parent
        readers.setdefault(reader, []).append((mods[m], a, k))
    every = [t for targets in readers.values() for t in targets]
    if on_load:
        model.register_load_state_dict_pre_hook(_EmptyOnLoad(every))
    else:  # out of parameters() and the state dict; drawn for each call
        _EmptyOnLoad(every)(model, {}, "")
    for reader, targets in readers.items():
        mods[reader].register_forward_pre_hook(_Draw(shared, targets))
        mods[reader].register_forward_hook(_Release(targets))
    return shared


def rebuild(model: nn.Module, manifest: dict) -> nn.Module:
    """``load_run``'s hook: attach the same shared array (layers, budget, hashes from the saved seed) to a fresh
    model, so that the saved ``rps.weight`` and ``rps.scale`` load into it."""
    L = manifest["learn"]
    attach(model, L["shared"], L["budget"], L["mapping"], L["chunk"], L["hash_seed"], L["grad_scale"], on_load=True)
    return model


def run(cfg, model: nn.Module, data: dict, ctx):
    """Share every prunable weight through one array of (1 - sparsity) x their count and train it
    ``cfg.epochs + cfg.finetune_epochs`` epochs; returns (the model, None)."""
    from prunekit.core.masks import prunable
    from prunekit.vision.train import evaluate, train_epochs

    o = ctx.options
    params = prunable(model, cfg.exclude)
    names = list(params)
    total = sum(p.numel() for p in params.values())
    budget = max(1, round((1.0 - cfg.sparsity) * total))
    if o.mapping == "identity" and budget != total:
        raise PruneError(f"mapping identity needs sparsity 0 (the full budget); got sparsity {cfg.sparsity}.")
    seed = cfg.seed if o.hash_seed is None else o.hash_seed
    params_before = sum(p.numel() for p in model.parameters())
    weights = [p.detach().clone() for p in params.values()]
    shared = attach(model, names, budget, o.mapping, o.chunk, seed, o.grad_scale)
    if o.init == "fit":
        shared.fit(weights)
    else:
        with torch.no_grad():
            shared.z.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    acc_init = evaluate(model, data["x_test"], data["y_test"])
    if ctx.progress:
        say(f"rps: {total:,} weights of {len(names)} layers drawn from one array of {budget:,} "
            f"({total / budget:.1f}x sharing)")
    train_epochs(model, data, cfg.epochs + cfg.finetune_epochs, cfg, None, "rps", ctx.history,
                 progress=ctx.progress, seed=cfg.seed, journey=ctx.journey)
    ctx.info["learn"] = {
        "method": "rps", "mapping": o.mapping, "chunk": o.chunk, "hash_seed": seed, "init": o.init,
        "grad_scale": o.grad_scale, "shared": names, "budget": budget, "shared_weights": total,
        "sharing": total / budget, "scales": [round(float(s), 6) for s in shared.scale],
        "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
        "acc_at_init": acc_init,
    }
    return model, None


LEARNED.register("rps", run, params=RpsOptions, rebuild=rebuild,
                 description="random parameter sharing: every conv / linear weight drawn by a seeded hash and sign "
                             "from one trained array of (1 - sparsity) x their size (ROAST / STABLE-RPS)")
