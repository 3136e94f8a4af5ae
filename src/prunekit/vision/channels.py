"""Structured channel pruning of any architecture that physically removes channels.

The dependency graph of coupled channels (residual adds, depthwise convolutions, concatenation, flatten,
BatchNorm) is Torch-Pruning's (``torch_pruning.DependencyGraph``, Fang et al., CVPR 2023): prunekit does not
re-implement it. What prunekit adds on top:

* its own criteria as channel importances (:class:`ScoreImportance`: SNIP / GraSP / SynFlow / Taylor /
  magnitude scores of :mod:`prunekit.vision.criteria` summed over every weight a channel group owns),
* a check that names unsupported ops and modules before anything is changed,
* a built-in verification: after removal the model must give the same outputs as the unpruned model with those
  channels zeroed (:func:`zero_channels`), else nothing is returned,
* PreCropping (Cai et al., 2022): layer densities from a pruning-at-initialization criterion turned into channel
  counts before training (:func:`precrop_ratios`),
* save/load without pickle: safetensors + the per-tensor shapes, rebuilt onto a fresh model (:func:`rebuild`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from prunekit.core.masks import prunable
from prunekit.core.registry import Registry
from prunekit.errors import PruneError
from prunekit.vision.lrp import LrpOptions


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d)
SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
             nn.PReLU, nn.Embedding, *_NORMS)


def _tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover
        raise PruneError("Channel pruning needs Torch-Pruning; run `pip install --no-deps torch-pruning`.") from e
    return tp


def output_modules(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Modules whose output *is* the model's output (the classifier): their output channels are kept."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []  # keep the outputs alive: ids of freed tensors are reused
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((mod, o)))
             for m in model.modules() if isinstance(m, SUPPORTED)]
    try:
        with torch.no_grad():
            y = model(example)
    finally:
        for h in hooks:
            h.remove()
    return [mod for mod, o in seen if o is y]


def check_supported(model: nn.Module, ignored: Sequence[nn.Module] = ()) -> None:
    """Raise a PruneError naming the first op with its own parameters that the graph cannot prune."""
    ignored_ids = {id(m) for m in ignored}
    inside_ignored = set()
    for name, mod in model.named_modules():
        if id(mod) in ignored_ids:
            inside_ignored.update(id(m) for m in mod.modules())
    for name, mod in model.named_modules():
        if id(mod) in inside_ignored:
            continue
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if own and not isinstance(mod, SUPPORTED):
            raise PruneError(
                f"Channel pruning does not support the op {type(mod).__name__} (module {name or '<root>'!r}, "
                f"parameters {', '.join(own)}); keep it with --exclude {name or '<root>'} (ignore=[...] in Python) or use unstructured pruning.")


def _plain(idxs, root: bool = False) -> torch.Tensor:
    """Graph indices (plain ints or Torch-Pruning's (idx, root_idx) pairs) as a long tensor."""
    attr = "root_idx" if root else "idx"
    return torch.as_tensor([int(getattr(i, attr)) if hasattr(i, attr) else int(i) for i in idxs], dtype=torch.long)


class ScoreImportance:
    """Channel importance = sum of per-weight scores (any prunekit criterion) over all weights the channel
    group removes: output rows of producers, input columns of consumers, BatchNorm affine entries."""

    def __init__(self, scores: dict[nn.Module, torch.Tensor]):
        self.scores = scores  # module -> score tensor shaped like module.weight

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        tp = _tp()
        n = len(group[0].idxs)
        imp = torch.zeros(n)
        dg = group._DG
        for dep, idxs in group:
            mod = dep.target.module
            s = self.scores.get(mod)
            if s is None or len(idxs) == 0:
                continue
            plain = _plain(idxs)
            root = _plain(idxs, root=True)
            if int(root.max()) >= n and len(root) % n == 0:  # a flatten spread each channel over len/n columns
                root = root // (len(root) // n)
            out = dg.is_out_channel_pruning_fn(dep.handler)
            depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups == mod.in_channels
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                out = not out
            if out or depthwise or s.dim() == 1:
                local = s.index_select(0, plain).reshape(len(plain), -1).sum(1)
            else:
                local = s.index_select(1, plain).transpose(0, 1).reshape(len(plain), -1).sum(1)
            imp.scatter_add_(0, root, local.float())
        del tp
        return imp


def _score_importance(criterion: str):
    def build(model, example, batches, input_shape, **options):
        from prunekit.vision.criteria import score

        names = list(prunable(model))
        s = score(model, criterion, names, batches=batches, input_shape=input_shape or tuple(example.shape[1:]),
                  options=options)
        mods = dict(model.named_modules())
        return ScoreImportance({mods[k.rsplit(".", 1)[0]]: v for k, v in s.items()})

    return build


# every channel criterion: fn(model, example, batches, input_shape, **its options) -> a Torch-Pruning importance
CHANNEL_CRITERIA = Registry("channel criterion")
CHANNEL_CRITERIA.register("magnitude", lambda *a: _tp().importance.GroupMagnitudeImportance(p=2), description="group L2 norm")
CHANNEL_CRITERIA.register("l1", lambda *a: _tp().importance.GroupMagnitudeImportance(p=1), description="group L1 norm")
CHANNEL_CRITERIA.register("lamp", lambda *a: _tp().importance.LAMPImportance(p=2), description="LAMP over groups")
CHANNEL_CRITERIA.register("taylor", lambda *a: _tp().importance.GroupTaylorImportance(), description="group Taylor")
CHANNEL_CRITERIA.register("random", lambda *a: _tp().importance.RandomImportance(), description="random (baseline)")
CHANNEL_CRITERIA.register("bn-scale", lambda *a: _tp().importance.BNScaleImportance(), description="|BatchNorm gamma|")
for _c in ("snip", "synflow", "grasp"):
    CHANNEL_CRITERIA.register(_c, _score_importance(_c), description=f"weight {_c} scores summed over the group")
CHANNEL_CRITERIA.register("lrp", _score_importance("lrp"), params=LrpOptions,
                          description="absolute LRP relevance of the group's weights on reference samples (Yeom et al. "
                                      "2021; options rule epsilon|alpha-beta, alpha, epsilon)")


def _importance(criterion: str, model: nn.Module, example: torch.Tensor, batches, input_shape, options=None):
    if options:  # the criterion's own options (its params, e.g. lrp's rule)
        return CHANNEL_CRITERIA.get(criterion).impl(model, example, batches, input_shape, **options)
    return CHANNEL_CRITERIA.get(criterion).impl(model, example, batches, input_shape)


@torch.no_grad()
def zero_channels(model: nn.Module, group, names: dict[nn.Module, str]) -> None:
    """Zero (in ``model``, a copy of the graph's model) what removing ``group`` removes on the output side:
    producers' output rows and biases, norm affine entries. The zeroed channels then carry exact zeros."""
    dg = group._DG
    mods = dict(model.named_modules())
    for dep, idxs in group:
        src = dep.target.module
        if src not in names or len(idxs) == 0:
            continue
        mod = mods[names[src]]
        plain = _plain(idxs)
        out = dg.is_out_channel_pruning_fn(dep.handler)
        depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups == mod.in_channels
        if isinstance(mod, _NORMS) and getattr(mod, "weight", None) is not None and mod.weight.dim() == 1:
            mod.weight[plain] = 0
            if mod.bias is not None:
                mod.bias[plain] = 0
        elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and (out or depthwise):
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                mod.weight[:, plain] = 0
            else:
                mod.weight[plain] = 0
            if mod.bias is not None:
                mod.bias[plain] = 0
        elif isinstance(mod, nn.PReLU) and mod.weight.numel() > 1:
            mod.weight[plain] = 0


def prune_channels(model: nn.Module, example: torch.Tensor, ratio: float = 0.3, criterion: str = "magnitude",
                   ratio_dict: dict[str, float] | None = None, global_pruning: bool = False,
                   ignore: Sequence[str] = (), round_to: int | None = None, batches=None,
                   input_shape: Sequence[int] | None = None, verify: bool = True, atol: float = 1e-4,
                   max_ratio: float = 0.9, remove: dict[str, Sequence[int]] | None = None,
                   options: dict | None = None) -> dict:
    """Remove a fraction ``ratio`` of the channels of every coupled group (in place) and return a report.

    ``ratio_dict``: per-module ratios (module name -> ratio) overriding ``ratio`` for groups rooted there.
    ``global_pruning``: rank normalized group scores over all groups (sizes then differ per layer; no group loses
    more than ``max_ratio`` of its channels).
    ``ignore``: module names whose channels stay (the classifier is always kept). ``verify``: check on
    ``example`` that the shrunk model equals the unpruned model with the removed channels zeroed.
    ``remove``: exactly these output channels instead of a criterion and ratio (module name -> indices in the
    unpruned model, e.g. the BatchNorm channels a learned method switched off; see :func:`explicit_groups`).
    ``options``: the criterion's own options (keyword arguments of its params, e.g. ``{"rule": "epsilon"}`` for lrp).
    """
    tp = _tp()
    for what, r in [("channel pruning ratio", ratio), *[(f"channel ratio of {k}", v) for k, v in (ratio_dict or {}).items()]]:
        if not (0.0 <= float(r) < 1.0):
            raise PruneError(f"The {what} must be in [0, 1) so every layer keeps at least 1 channel; got {r}.")
    mods = dict(model.named_modules())
    bad = [n for n in list(ignore) + list(ratio_dict or {}) + list(remove or {}) if n not in mods]
    if bad:
        raise PruneError(f"No module named {bad[0]!r} in the model; use names from model.named_modules().")
    was = model.training
    model.eval()
    keep_out = output_modules(model, example)
    ignored = keep_out + [mods[n] for n in ignore]
    check_supported(model, ignored)
    names = {m: n for n, m in model.named_modules()}
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    n_before = sum(p.numel() for p in model.parameters())
    reference = copy.deepcopy(model) if verify else None

    if remove is not None:
        groups = explicit_groups(model, example, remove, ignored)
    else:
        imp = _importance(criterion, model, example, batches, input_shape, options)
        if criterion == "taylor":
            if not batches:
                raise PruneError("Channel criterion 'taylor' needs training batches.")
            import torch.nn.functional as F
            model.zero_grad(set_to_none=True)
            for x, y in batches:
                F.cross_entropy(model(x), y).backward()
        pruner = tp.pruner.BasePruner(
            model, example, importance=imp, pruning_ratio=float(ratio), global_pruning=global_pruning,
            pruning_ratio_dict={mods[k]: float(v) for k, v in (ratio_dict or {}).items()} or None,
            ignored_layers=ignored, round_to=round_to, max_pruning_ratio=max_ratio)
        groups = pruner.step(interactive=True)
    removed = 0
    for group in groups:
        if reference is not None:
            zero_channels(reference, group, names)
        removed += 1
        group.prune()
    model.zero_grad(set_to_none=True)
    after = {n: tuple(p.shape) for n, p in model.named_parameters()}
    report = {"criterion": criterion if remove is None else "explicit", "ratio": ratio, "groups_pruned": removed,
              "params_before": n_before, "params_after": sum(p.numel() for p in model.parameters()),
              "changed": {n: [list(before[n]), list(after[n])] for n in after if before.get(n) != after[n]}}
    if reference is not None:
        with torch.no_grad():
            a, b = model(example), reference(example)
        err = float((a - b).abs().max())
        report["verify_max_abs_diff"] = err
        if not torch.allclose(a, b, atol=atol, rtol=1e-3):
            raise PruneError(f"Channel removal changed the outputs (max |diff| {err:.3g}) compared with zeroing the "
                             "same channels: the graph mis-handles an op in this model; --exclude the module around it.")
    model.train(was)
    return report


def _out_groups(model: nn.Module, example: torch.Tensor, names: Sequence[str]):
    """The dependency graph and, for each named module, its whole output-channel group on it (or None: the graph
    cannot remove its output channels)."""
    tp = _tp()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        mod = mods[n]
        pruner = dg.get_pruner_of_module(mod) if mod in dg.module2node else None
        size = pruner.get_out_channels(mod) if pruner is not None else None
        out[n] = None if size is None else dg.get_pruning_group(mod, pruner.prune_out_channels, list(range(size)))
    return dg, out


def coupled_outputs(model: nn.Module, example: torch.Tensor, names: Sequence[str]) -> dict[str, list[str]]:
    """For each named module, the names of every module whose output channels go with its own on the dependency
    graph (the conv before a BatchNorm, residual partners ...; itself included); [] if the graph cannot remove
    its output channels."""
    was = model.training
    model.eval()
    dg, groups = _out_groups(model, example, names)
    model.train(was)
    mnames = {m: n for n, m in model.named_modules()}
    return {n: [] if g is None else list(dict.fromkeys(
        mnames[it.dep.target.module] for it in g
        if dg.is_out_channel_pruning_fn(it.dep.handler) and it.dep.target.module in mnames)) for n, g in groups.items()}


def explicit_groups(model: nn.Module, example: torch.Tensor, remove: dict[str, Sequence[int]],
                    ignored: Sequence[nn.Module] = ()):
    """Torch-Pruning groups that remove exactly the listed output channels (module name -> channel indices of the
    unpruned model), everything checked before the first group is handed out. Modules whose output channels are
    coupled (a conv and its BatchNorm, residual partners) form one group: a coupled channel goes only when every
    listed member of the group lists it. Refused: an index out of range, a module the graph cannot shrink, every
    channel of a group, a channel that is also an output channel of ``ignored`` (the classifier), or listed
    modules coupled through a concatenation. The groups are built one at a time, after the previous one was
    pruned (iterate and call ``group.prune()``)."""
    dg, groups = _out_groups(model, example, list(remove))
    mnames = {m: n for n, m in model.named_modules()}
    ignored_ids = {id(m) for m in ignored}
    plan, done = [], set()
    for n, idxs in remove.items():
        group = groups[n]
        if group is None:
            raise PruneError(f"Module {n!r} has no output channels the dependency graph can remove.")
        size = len(group[0].idxs)
        try:
            listed = {int(i) for i in idxs}
        except (TypeError, ValueError):
            raise PruneError(f"The channels to remove from {n!r} must be integer indices.") from None
        wrong = sorted(i for i in listed if not 0 <= i < size)
        if wrong:
            raise PruneError(f"Channel {wrong[0]} of {n!r} does not exist; it has {size} output channels.")
        if n in done:
            continue
        votes = set(range(size))  # root channels that every listed member of the group agrees to remove
        members = []
        for it in group:
            target = it.dep.target.module
            tname = mnames.get(target) if isinstance(target, nn.Module) else None
            if not dg.is_out_channel_pruning_fn(it.dep.handler) or tname is None or tname not in remove:
                continue
            pairs = list(zip(_plain(it.idxs).tolist(), _plain(it.root_idxs).tolist()))
            if len(pairs) != size or len(groups[tname][0].idxs) != size:
                raise PruneError(f"Modules {n!r} and {tname!r} are coupled through a concatenation; remove their "
                                 "channels by a ratio (prune_channels without remove=).")
            mine = {int(i) for i in remove[tname]}
            votes &= {r for i, r in pairs if i in mine}
            members.append(tname)
        done.update(members)
        if not votes:
            continue
        if len(votes) >= size:
            raise PruneError(f"Removing every output channel of {n!r} would disconnect the network; keep at least 1.")
        for it in group:
            target = it.dep.target.module
            if dg.is_out_channel_pruning_fn(it.dep.handler) and id(target) in ignored_ids and \
                    votes & set(_plain(it.root_idxs).tolist()):
                raise PruneError(f"Removing channels of {n!r} would also remove output channels of "
                                 f"{mnames.get(target, type(target).__name__)!r}, which stay (the model's output or "
                                 "an excluded module).")
        plan.append((n, sorted(votes)))

    def build():
        mods = dict(model.named_modules())
        for n, roots in plan:
            mod = mods[n]
            yield dg.get_pruning_group(mod, dg.get_pruner_of_module(mod).prune_out_channels, roots)

    return build()


def precrop_ratios(model: nn.Module, densities: dict[str, float]) -> dict[str, float]:
    """PreCropping: per-layer weight densities (parameter name -> density, e.g. from SNIP/SynFlow at init with
    global allocation) -> per-module channel pruning ratios. A conv/linear whose inputs and outputs both shrink by
    the same factor r keeps r^2 of its weights, so r = sqrt(density) (the channel count is then rounded by the
    graph, at least 1 channel stays)."""
    out = {}
    for pname, d in densities.items():
        mname = pname.rsplit(".", 1)[0]
        keep = min(1.0, math.sqrt(max(d, 0.0)))
        out[mname] = min(1.0 - keep, 0.99)
    return out


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of convolutions and linear layers for ``example`` (subclasses such as TF-"same"
    convolutions included, which type-keyed counters miss)."""
    total = [0]

    def conv(m, i, o):
        total[0] += o.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def lin(m, i, o):
        total[0] += o.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.modules.conv._ConvNd) else lin)
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        was = model.training
        model.eval()
        model(example)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


# -- save / load without pickle ---------------------------------------------------------------------------

def shapes_of(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@torch.no_grad()
def rebuild(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Resize ``model``'s parameters/buffers (fresh, unpruned) to the recorded shapes and fix the size attributes
    of convs, linears and norms, so that a channel-pruned state dict loads with ``strict=True``."""
    sd = model.state_dict()
    missing = [k for k in shapes if k not in sd]
    if missing:
        raise PruneError(f"The saved shapes name tensors this model lacks ({missing[0]}); build the same architecture.")
    mods = dict(model.named_modules())
    for key, shape in shapes.items():
        if list(sd[key].shape) == list(shape):
            continue
        mname, attr = key.rsplit(".", 1) if "." in key else ("", key)
        mod = mods[mname]
        old = getattr(mod, attr)
        new = torch.zeros(shape, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            mod.register_buffer(attr, new)
    for mod in model.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            w = mod.weight
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
            else:
                depthwise = mod.groups > 1 and mod.groups == mod.in_channels and w.shape[1] == 1
                mod.out_channels = w.shape[0]
                if depthwise:
                    mod.groups = mod.in_channels = w.shape[0]
                else:
                    mod.in_channels = w.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            mod.num_features = ref.shape[0]
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
            mod.num_channels = mod.weight.shape[0]
    return model
