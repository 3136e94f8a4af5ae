"""FedTiny (Huang et al., ICDCS 2023, "Distributed Pruning Towards Tiny Neural Networks in Federated Learning"):
learner ``fedtiny``, a federated run on Flower (``flwr``: a ``ServerApp`` and a ``ClientApp`` exchanging
``Message`` s of ``ArrayRecord`` / ``MetricRecord`` / ``ConfigRecord``, FedAvg by Flower's
``aggregate_arrayrecords``).

The training images are split over ``clients`` simulated clients, non-IID: for every class a Dirichlet(``alpha``)
draw decides which share of that class each client gets (seeded; small alpha: each client sees few classes). The
server holds the test set only. Rounds of the ``fedtiny`` variant:

* **round 0, adaptive BatchNorm selection**: the server makes ``candidates`` masks of the initial weights at the
  recipe's sparsity, magnitude scores spread by the allocations ``allocations`` in turn (erk, uniform, lamp, ...;
  the candidates after the first pass use scores ``|w| exp(perturb z)``, z ~ N(0, 1) seeded), and sends each one
  sparse. Every client re-estimates the BatchNorm statistics of each candidate on ``bn_batches`` batches of its
  data (:func:`prunekit.vision.train.recalibrate_bn`) and reports the loss on them with the statistics; the server
  takes the candidate with the lowest sample-weighted loss, with the sample-weighted mean of its clients'
  statistics.
* **rounds 1..R, masked FedAvg**: each client trains ``local_epochs`` on its data with the mask fixed
  (:func:`prunekit.vision.train.train_epochs`, masks enforced) and sends back its kept weights; the server averages
  them weighted by the clients' image counts.
* **progressive pruning** (rounds r < T_end = R - ``finetune_rounds`` with r % ``adjust_every`` == 0): every
  layer adjusts n_l = floor(a_r kept_l) weights, a_r = ``adjust_fraction`` (1 + cos(pi r / T_end)) / 2 (RigL's
  cosine decay). Each client also sends, per layer, only the top-K_l = ceil(``topk_factor`` n_l) gradients of
  the *pruned* weights (the loss gradient over ``grad_batches`` batches at its trained weights: K indices and K
  values); the server sums them weighted by image counts, removes the n_l kept weights of smallest magnitude, and
  grows the n_l pruned positions of largest aggregated gradient magnitude (at zero), so every layer keeps its
  count and the sparsity stays at the target. The last ``finetune_rounds`` rounds keep the mask.

Baselines in the same machinery (``variant``): ``dense`` (FedAvg of the dense model, R rounds) and ``prune-after``
(dense FedAvg for T_end rounds, then magnitude pruning of the global model to the recipe's sparsity by the
recipe's allocation, then ``finetune_rounds`` masked rounds): the same R rounds and local epochs.

Communication is the bytes of the records' payloads as Flower serializes them (each ``Array``'s ``data``, 8 bytes
per metric / config value): a masked tensor travels as its kept values (float32, in row-major order of the kept
positions) plus, only when the client does not have that mask yet, the mask as a bitmap (1 bit per weight);
BatchNorm buffers and other parameters travel dense; gradient reports as int32 indices + float32 values.
Client memory: the values a client holds (kept weights, other parameters, BatchNorm buffers, mask bits) and an
estimate of peak training memory for a sparse implementation: weights, gradients and SGD momentum of the kept
values, the mask bits, the activations of one batch (every leaf module's output, measured once), and in a
gradient-report round the dense gradient of the largest masked layer plus the top-K buffer.

The rounds run in this process through a :class:`LocalGrid` (Flower's ``Grid`` interface: the messages go to the
``ClientApp`` and its replies come back in node order), so a run is deterministic: with one client, the
federated run equals central training on that client's data for the same steps. ``cfg.epochs`` and
``cfg.finetune_epochs`` are not used (``rounds`` x ``local_epochs`` is the training).
"""

from __future__ import annotations

import copy
import functools
import math
import os
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.journey import live_parameters
from prunekit.core.masks import Masks, keep_highest, prunable
from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED

VARIANTS = ("fedtiny", "dense", "prune-after")
CANDIDATE_ALLOCATIONS = ("erk", "uniform", "lamp", "global")
MASK = "::mask"  # key suffix of a mask bitmap in an ArrayRecord
MIN_IMAGES = 8  # every client holds at least this many training images


class FedTinyOptions(Config):
    """The options of learner ``fedtiny`` (recipe ``options``, ``--option KEY=VALUE``)."""

    what = "fedtiny option"
    variant: Literal["fedtiny", "dense", "prune-after"] = Field(
        "fedtiny", description="fedtiny: selection + progressive pruning; dense: FedAvg of the dense model; "
        "prune-after: dense FedAvg, magnitude pruning, finetune_rounds masked rounds")
    clients: int = Field(4, description="simulated clients (the training images split over them)")
    rounds: int = Field(10, description="federated training rounds R (after the selection round)")
    local_epochs: int = Field(1, description="epochs each client trains on its data per round")
    alpha: float = Field(0.5, description="Dirichlet concentration of each class over the clients (small: "
                         "non-IID)")
    candidates: int = Field(4, description="fedtiny: candidate masks of the adaptive BatchNorm selection")
    allocations: list[str] = Field(["erk", "uniform", "lamp", "global"], description="fedtiny: layer-wise "
                                   "allocations the candidates take in turn (" + " | ".join(CANDIDATE_ALLOCATIONS)
                                   + ")")
    perturb: float = Field(0.2, description="fedtiny: candidates after one pass of the allocations score "
                           "|w| exp(perturb z), z ~ N(0, 1)")
    bn_batches: int = Field(4, description="fedtiny: client batches for each candidate's BatchNorm statistics "
                            "and loss")
    adjust_every: int = Field(2, description="fedtiny: rounds between mask adjustments")
    adjust_fraction: float = Field(0.2, description="fedtiny: fraction of each layer's kept weights moved at the "
                                   "first adjustment (cosine decay to 0 at T_end)")
    topk_factor: float = Field(1.0, description="fedtiny: each client reports ceil(topk_factor x n_l) gradients "
                               "of the pruned weights of a layer that moves n_l")
    grad_batches: int = Field(4, description="fedtiny: client batches the reported gradient is averaged over")
    finetune_rounds: int = Field(2, description="fedtiny / prune-after: last rounds with the mask fixed "
                                 "(T_end = rounds - finetune_rounds)")

    @model_validator(mode="after")
    def _check(self):
        if not 1 <= self.clients <= 100:
            raise ValueError(f"clients must be between 1 and 100, got {self.clients}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be at least 1, got {self.local_epochs}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")
        bad = [a for a in self.allocations if a not in CANDIDATE_ALLOCATIONS]
        if not self.allocations or bad:
            raise ValueError(f"allocations must be a list of {', '.join(CANDIDATE_ALLOCATIONS)}, got "
                             f"{self.allocations}")
        if self.perturb < 0:
            raise ValueError(f"perturb must be at least 0, got {self.perturb}")
        for k in ("bn_batches", "adjust_every", "grad_batches"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}")
        if not 0.0 <= self.adjust_fraction < 1.0:
            raise ValueError(f"adjust_fraction must be in [0, 1), got {self.adjust_fraction}")
        if not self.topk_factor >= 1.0:
            raise ValueError(f"topk_factor must be at least 1, got {self.topk_factor}")
        if self.variant != "dense" and not 0 <= self.finetune_rounds < self.rounds:
            raise ValueError(f"finetune_rounds must be in [0, rounds={self.rounds}), got {self.finetune_rounds}")
        return self


# -- data --------------------------------------------------------------------------------------------------

def dirichlet_split(labels: torch.Tensor, clients: int, alpha: float, seed: int = 0,
                    min_images: int = MIN_IMAGES, tries: int = 100) -> list[torch.Tensor]:
    """Indices of each client's images: for every class c, shares p_c ~ Dirichlet(alpha 1) over the clients and
    that class's images (in a seeded random order) cut at the cumulative shares. Redrawn (same generator) until
    every client holds at least ``min_images``; each client's indices ascending (one client: all, in order)."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes = np.unique(y)
    for _ in range(tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).round().astype(int)
            for i, part in enumerate(np.split(idx, cuts)):
                parts[i].append(part)
        out = [torch.from_numpy(np.sort(np.concatenate(p))) for p in parts]
        if min(len(p) for p in out) >= min_images:
            return out
    raise PruneError(f"{len(y)} training images cannot give each of {clients} clients at least {min_images} "
                     f"with alpha={alpha}; use more images (--train-subset), fewer clients or a larger alpha.")


def client_seed(seed: int, rnd: int, client: int) -> int:
    """The data-order seed of ``client`` (0-based) in round ``rnd`` (1-based) of a run with ``seed``."""
    return seed + 1000 * rnd + client


# -- records: what travels, and its bytes ------------------------------------------------------------------

def transported(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state that travels: every floating entry of the state dict (parameters and BatchNorm statistics; the
    integer batch counters stay home)."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def pack(state: dict[str, torch.Tensor], masks: Masks | None = None, send_masks: bool = False):
    """An ``ArrayRecord`` of ``state``: a masked tensor as its kept values (1-D, row-major order of the kept
    positions) plus, with ``send_masks``, its mask as a bitmap under ``name::mask``; the rest dense."""
    from flwr.app import Array, ArrayRecord

    arrays = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if masks is not None and k in masks:
            m = masks[k].cpu()
            arrays[k] = Array(v[m].numpy())
            if send_masks:
                arrays[k + MASK] = Array(np.packbits(m.numpy().reshape(-1)))
        else:
            arrays[k] = Array(v.numpy())
    return ArrayRecord(arrays)


def masks_of(record, like: dict[str, torch.Tensor]) -> Masks | None:
    """The masks a record carries (bitmaps under ``name::mask``, shaped as ``like[name]``), or None."""
    out = {}
    for key, arr in record.items():
        if key.endswith(MASK):
            k = key[: -len(MASK)]
            bits = np.unpackbits(arr.numpy(), count=like[k].numel()).astype(bool)
            out[k] = torch.from_numpy(bits).reshape(like[k].shape)
    return Masks(out) if out else None


def unpack(record, like: dict[str, torch.Tensor], masks: Masks | None = None) -> dict[str, torch.Tensor]:
    """The dense state of a record made by :func:`pack` (masked entries scattered into zeros by ``masks``)."""
    out = {}
    for k, ref in like.items():
        v = torch.from_numpy(record[k].numpy().copy())
        if masks is not None and k in masks:
            dense = torch.zeros_like(ref)
            dense[masks[k]] = v.to(ref.dtype)
            v = dense
        out[k] = v.reshape(ref.shape).to(ref.dtype)
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` (a :func:`transported` subset) into the model's tensors in place."""
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            sd[k].copy_(v)
    return model


def payload_bytes(content) -> int:
    """Bytes of a ``RecordDict``'s payload as Flower serializes it: each ``Array``'s ``data``; 8 bytes per metric /
    config value (lists: per element)."""
    total = 0
    for rec in content.array_records.values():
        total += sum(len(a.data) for a in rec.values())
    for rec in list(content.metric_records.values()) + list(content.config_records.values()):
        total += sum(8 * (len(v) if isinstance(v, list) else 1) for v in rec.values())
    return total


# -- the in-process grid -----------------------------------------------------------------------------------

@functools.cache
def _grid_class():
    """:class:`LocalGrid`'s class, a subclass of Flower's ``Grid`` (made on first use: flwr is imported only when a
    run needs it)."""
    from flwr.app import Context, Message, RecordDict
    from flwr.serverapp import Grid
    from flwr.supercore.run import Run

    class LocalGrid(Grid):
        """Flower's ``Grid`` served in this process: a pushed message is handled at once by the ``ClientApp`` of
        its node (each node keeps its own ``Context``, whose ``state`` persists between rounds) and its reply is
        kept until pulled. ``down`` / ``up``: the payload bytes sent per ``group_id`` (the round)."""

        def __init__(self, app, nodes: int):
            self.app = app
            self.contexts = {i: Context(run_id=0, node_id=i, node_config={}, state=RecordDict(), run_config={})
                             for i in range(1, nodes + 1)}
            self._run = Run.create_empty(0)
            self._replies: dict = {}
            self._sent = 0
            self.down: dict[str, int] = {}
            self.up: dict[str, int] = {}

        def set_run(self, run) -> None:
            self._run = run

        @property
        def run(self):
            return self._run

        def create_message(self, content, message_type: str, dst_node_id: int, group_id: str, ttl=None):
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> list[int]:
            return list(self.contexts)

        def push_messages(self, messages) -> list[str]:
            ids = []
            for msg in messages:
                self._sent += 1
                mid = f"m{self._sent}"
                msg.metadata.__dict__["_message_id"] = mid  # what a SuperLink does on push
                group = msg.metadata.group_id
                self.down[group] = self.down.get(group, 0) + payload_bytes(msg.content)
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
                self.up[group] = self.up.get(group, 0) + payload_bytes(reply.content)
                self._replies[mid] = reply
                ids.append(mid)
            return ids

        def pull_messages(self, message_ids) -> list:
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

        def send_and_receive(self, messages, *, timeout=None) -> list:
            return self.pull_messages(self.push_messages(messages))

    return LocalGrid


def local_grid(app, nodes: int):
    """A :class:`LocalGrid` serving ``app`` on nodes 1..``nodes``."""
    return _grid_class()(app, nodes)


def run_server(server_app, grid) -> None:
    """Run ``server_app`` on ``grid`` in this process (the identity a SuperLink gives a ServerApp task)."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID
    server_app(grid, Context(run_id=0, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                             run_config={}))


# -- masks: candidates and the server's move ---------------------------------------------------------------

def candidate_masks(model: nn.Module, sparsity: float, n: int, allocations: list[str], perturb: float,
                    seed: int = 0, exclude=()) -> list[Masks]:
    """``n`` masks at ``sparsity``: candidate i spreads magnitude scores by ``allocations[i % len]``; from the
    second pass on the scores are |w| exp(perturb z), z ~ N(0, 1) from a generator seeded by (seed, i)."""
    from prunekit.core.allocate import allocate_masks

    weights = {k: p.detach().abs() for k, p in prunable(model, exclude).items()}
    out = []
    for i in range(n):
        scores = weights
        if i >= len(allocations):
            g = torch.Generator().manual_seed(seed * 7919 + i)
            scores = {k: w * torch.exp(perturb * torch.randn(w.shape, generator=g)) for k, w in weights.items()}
        out.append(allocate_masks(scores, sparsity, allocations[i % len(allocations)], slack="kept"))
    return out


def adjust_counts(masks: Masks, fraction: float) -> dict[str, int]:
    """Weights each layer moves: floor(fraction x kept), at most the layer's pruned count."""
    return {k: min(int(math.floor(fraction * int(m.sum()))), int((~m).sum())) for k, m in masks.items()}


def cosine_fraction(start: float, rnd: int, end: int) -> float:
    """RigL's update fraction a_r = start (1 + cos(pi r / end)) / 2."""
    return start * (1.0 + math.cos(math.pi * rnd / max(1, end))) / 2.0


def prune_and_grow(weights: dict[str, torch.Tensor], masks: Masks, grads: dict[str, torch.Tensor],
                   counts: dict[str, int]) -> tuple[Masks, dict[str, int]]:
    """The server's move per layer: g = the aggregated gradient (0 where no client reported); n = min(counts,
    pruned positions with g != 0); remove the n kept weights of smallest |w| and grow the n previously pruned
    positions of largest |g| (ties: the earlier position loses). The kept count never changes. Returns the new
    masks and n per layer."""
    new, moved = {}, {}
    for k, m in masks.items():
        g = grads[k]
        grow_ok = ~m & (g != 0)
        n = min(counts.get(k, 0), int(grow_ok.sum()))
        moved[k] = n
        if n == 0:
            new[k] = m.clone()
            continue
        minus_inf = torch.tensor(float("-inf"))
        stay = keep_highest(torch.where(m, weights[k].abs().float(), minus_inf), int(m.sum()) - n)
        grow = keep_highest(torch.where(grow_ok, g.abs().float(), minus_inf), n)
        new[k] = stay | grow
    return Masks(new), moved


# -- client memory -----------------------------------------------------------------------------------------

def activation_floats(model: nn.Module, example: torch.Tensor) -> int:
    """Floats of every leaf module's output for the batch ``example`` (what backward keeps, roughly)."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(example)  # the same output sizes as in training, and BatchNorm statistics untouched
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return total[0]


def client_memory(model: nn.Module, masks: Masks | None, batch: torch.Tensor, topk: int = 0) -> dict:
    """Values a client holds and its peak training memory estimate (bytes) for a sparse implementation: weights,
    gradients and SGD momentum of the kept values (4 bytes each), BatchNorm buffers, mask bits, one batch's
    activations; ``topk`` > 0 (a gradient-report round): plus the dense gradient of the largest masked layer and
    ``topk`` reported (index, value) pairs."""
    params = dict(model.named_parameters())
    masked = dict(masks.items()) if masks is not None else {}
    trainable = sum(int(masked[k].sum()) if k in masked else p.numel() for k, p in params.items())
    buffers = sum(v.numel() for k, v in transported(model).items() if k not in params)
    mask_bytes = sum(math.ceil(m.numel() / 8) for m in masked.values())
    acts = activation_floats(model, batch)
    report = 4 * max((m.numel() for m in masked.values()), default=0) + 8 * topk if topk else 0
    return {"values_held": trainable + buffers, "bytes_held": 4 * (trainable + buffers) + mask_bytes,
            "peak_train_bytes": 4 * (3 * trainable + buffers + acts) + mask_bytes + report,
            "activation_bytes": 4 * acts, "mask_bytes": mask_bytes}


# -- the apps ----------------------------------------------------------------------------------------------

def make_client_app(template: nn.Module, shards: list[dict], cfg, o: FedTinyOptions):
    """The ``ClientApp``: node i (1-based) holds ``shards[i - 1]``. ``query.bnselect``: each candidate's loss after
    re-estimating its BatchNorm statistics (and those statistics); ``train``: ``local_epochs`` with the mask,
    then the kept weights back (and, when the config names ``topk``, the top-K pruned-weight gradients)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from prunekit.vision.data import batches_of
    from prunekit.vision.train import recalibrate_bn, train_epochs

    app = ClientApp()
    like = transported(template)
    params = dict(template.named_parameters())
    bn_keys = [k for k in like if k not in params]

    def model_from(record, masks):
        model = copy.deepcopy(template)
        return load_into(model, unpack(record, like, masks))

    @app.query("bnselect")
    def select(msg, context):
        shard = shards[context.node_id - 1]
        seed = client_seed(cfg.seed, 0, context.node_id - 1)
        losses, content = [], {}
        for c in range(int(msg.content["config"]["candidates"])):
            rec = msg.content[f"cand{c}"]
            model = model_from(rec, masks_of(rec, like))
            recalibrate_bn(model, shard, o.bn_batches, cfg.batch_size, seed)
            model.eval()
            with torch.no_grad():
                batches = batches_of(shard, o.bn_batches, cfg.batch_size, seed)
                loss = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in batches)
            losses.append(loss / sum(len(y) for _, y in batches))
            if bn_keys:
                sd = model.state_dict()
                content[f"bn{c}"] = ArrayRecord({k: Array(sd[k].numpy()) for k in bn_keys})
        content["metrics"] = MetricRecord({"num-examples": len(shard["y_train"]), "loss": losses})
        return Message(RecordDict(content), reply_to=msg)

    @app.train()
    def train(msg, context):
        shard, cid = shards[context.node_id - 1], context.node_id - 1
        conf = msg.content["config"]
        rec = msg.content["model"]
        masks = None
        if conf["masked"]:
            masks = masks_of(rec, like)
            if masks is not None:  # a new mask: the client keeps its bitmap
                context.state["mask"] = ArrayRecord({k + MASK: rec[k + MASK] for k in masks})
            else:
                masks = masks_of(context.state["mask"], like)
        model = model_from(rec, masks)
        hist: list = []
        steps = train_epochs(model, shard, o.local_epochs, cfg, masks, "client", hist, progress=False,
                             seed=client_seed(cfg.seed, int(conf["round"]), cid))
        n = len(shard["y_train"])
        content = {"arrays": pack(transported(model), masks),
                   "metrics": MetricRecord({"num-examples": n, "steps": steps, "loss": hist[-1]["loss"],
                                            "train_acc": hist[-1]["train_acc"]})}
        if "topk" in conf:
            content["grads"] = ArrayRecord(top_gradients(model, masks, dict(zip(masks, conf["topk"])),
                                                         batches_of(shard, o.grad_batches, cfg.batch_size,
                                                                    client_seed(cfg.seed, int(conf["round"]), cid))))
        return Message(RecordDict(content), reply_to=msg)

    return app


def top_gradients(model: nn.Module, masks: Masks, topk: dict[str, int], batches) -> dict:
    """``Array`` s ``name::idx`` (int32 flat positions) and ``name::val`` (float32): per masked layer the ``topk``
    pruned positions of largest |dL/dw|, L the mean cross-entropy over ``batches`` (training mode)."""
    from flwr.app import Array

    params = dict(model.named_parameters())
    model.zero_grad()
    model.train()
    for x, y in batches:
        (F.cross_entropy(model(x), y) / len(batches)).backward()
    out = {}
    for k, m in masks.items():
        g = params[k].grad.detach().reshape(-1)
        score = torch.where(~m.reshape(-1), g.abs(), torch.tensor(-1.0))
        idx = torch.topk(score, min(int(topk[k]), int((~m).sum()))).indices.sort().values
        out[k + "::idx"] = Array(idx.to(torch.int32).numpy())
        out[k + "::val"] = Array(g[idx].numpy())
    model.zero_grad()
    return out


def aggregate_gradients(replies, like: dict[str, torch.Tensor], masks: Masks) -> dict[str, torch.Tensor]:
    """Sum over clients of (images_i / images) x the client's reported gradient entries, as dense tensors."""
    total = sum(int(r.content["metrics"]["num-examples"]) for r in replies)
    out = {k: torch.zeros(like[k].numel()) for k in masks}
    for r in replies:
        w = int(r.content["metrics"]["num-examples"]) / total
        rec = r.content["grads"]
        for k in masks:
            idx = torch.from_numpy(rec[k + "::idx"].numpy().astype(np.int64))
            out[k].index_add_(0, idx, w * torch.from_numpy(rec[k + "::val"].numpy().copy()))
    return {k: v.reshape(like[k].shape) for k, v in out.items()}


def federate(cfg, o: FedTinyOptions, model: nn.Module, shards: list[dict], test: tuple, journey=None,
             progress: bool = False) -> dict:
    """Run ``o.variant`` on Flower's apps over the in-process grid; ``model`` ends with the global weights.
    Returns {"masks", "rounds": per-round rows, "selection"?, "dense_acc"?, "acc_after_prune"?, "grid"}."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from prunekit.vision.schedules import compute_masks
    from prunekit.vision.train import evaluate

    template = copy.deepcopy(model)
    like = transported(model)
    t_end = o.rounds - (o.finetune_rounds if o.variant != "dense" else 0)
    out: dict = {"rounds": []}
    server = ServerApp()

    def broadcast(grid, content_of, kind: str, group: str):
        return grid.send_and_receive([grid.create_message(content_of(n), kind, n, group)
                                      for n in grid.get_node_ids()])

    @server.main()
    def main(grid, context):
        masks: Masks | None = None
        if o.variant == "fedtiny":
            cands = candidate_masks(model, cfg.sparsity, o.candidates, o.allocations, o.perturb, cfg.seed,
                                    cfg.exclude)
            state = transported(model)
            content = {f"cand{c}": pack(state, m, send_masks=True) for c, m in enumerate(cands)}
            content["config"] = ConfigRecord({"candidates": len(cands)})
            replies = broadcast(grid, lambda n: RecordDict(content), "query.bnselect", "0")
            total = sum(int(r.content["metrics"]["num-examples"]) for r in replies)
            share = [int(r.content["metrics"]["num-examples"]) / total for r in replies]
            losses = [sum(s * float(r.content["metrics"]["loss"][c]) for s, r in zip(share, replies))
                      for c in range(len(cands))]
            best = int(np.argmin(losses))
            masks = cands[best]
            with torch.no_grad():
                masks.apply(model)
            if f"bn{best}" in replies[0].content:
                bn = aggregate_arrayrecords([RecordDict({"a": r.content[f"bn{best}"], "m": r.content["metrics"]})
                                             for r in replies], "num-examples")
                load_into(model, {k: torch.from_numpy(a.numpy().copy()) for k, a in bn.items()})
            out["selection"] = {"losses": losses, "chosen": best,
                                "allocations": [o.allocations[c % len(o.allocations)] for c in range(len(cands))],
                                "perturbed": [c >= len(o.allocations) for c in range(len(cands))],
                                "acc": evaluate(model, *test)}
        new_mask = masks is not None
        steps = 0
        for r in range(1, o.rounds + 1):
            adjusting = (o.variant == "fedtiny" and o.adjust_fraction > 0 and r % o.adjust_every == 0
                         and r < t_end)
            conf = {"round": r, "masked": masks is not None}
            counts = {}
            if adjusting:
                counts = adjust_counts(masks, cosine_fraction(o.adjust_fraction, r, t_end))
                conf["topk"] = [int(math.ceil(o.topk_factor * counts[k])) for k in masks]
                out["topk_max"] = max(out.get("topk_max", 0), sum(conf["topk"]))
            record = pack(transported(model), masks, send_masks=new_mask)
            replies = broadcast(grid, lambda n: RecordDict({"model": record, "config": ConfigRecord(conf)}),
                                "train", str(r))
            agg = aggregate_arrayrecords([RecordDict({"arrays": x.content["arrays"], "m": x.content["metrics"]})
                                          for x in replies], "num-examples")
            load_into(model, unpack(agg, like, masks))
            total = sum(int(x.content["metrics"]["num-examples"]) for x in replies)
            for x in replies:
                if journey is not None:
                    journey.add(live_parameters(model, masks), int(x.content["metrics"]["steps"]))
            steps += max(int(x.content["metrics"]["steps"]) for x in replies)
            new_mask = False
            moved = None
            if adjusting:
                grads = aggregate_gradients(replies, like, masks)
                masks, moved_l = prune_and_grow(dict(model.named_parameters()), masks, grads, counts)
                masks.apply(model)
                moved, new_mask = sum(moved_l.values()), True
            if o.variant == "prune-after" and r == t_end:
                out["dense_acc"] = evaluate(model, *test)
                masks = compute_masks(model, cfg.sparsity, "magnitude", cfg.allocation or "global",
                                      cfg.min_density, exclude=cfg.exclude)
                masks.apply(model)
                out["acc_after_prune"] = evaluate(model, *test)
                new_mask = True
            metrics = [x.content["metrics"] for x in replies]
            row = {"phase": "round", "epoch": r, "step": steps,
                   "loss": sum(float(m["loss"]) * int(m["num-examples"]) for m in metrics) / total,
                   "train_acc": sum(float(m["train_acc"]) * int(m["num-examples"]) for m in metrics) / total,
                   "test_acc": evaluate(model, *test), "sparsity": masks.sparsity() if masks is not None else 0.0,
                   "bytes_down": grid.down[str(r)], "bytes_up": grid.up[str(r)], "moved": moved}
            out["rounds"].append(row)
            if progress:
                say(f"{o.variant} round {r}/{o.rounds}: test acc {row['test_acc']:.4f}, sparsity "
                    f"{row['sparsity']:.3f}, {row['bytes_down'] / 1e6:.2f} MB down, {row['bytes_up'] / 1e6:.2f} MB "
                    "up" + (f", {moved} weights moved" if moved is not None else ""))
        out["masks"] = masks

    grid = local_grid(make_client_app(template, shards, cfg, o), len(shards))
    run_server(server, grid)
    out["grid"] = grid
    return out


def client_shards(data: dict, o: FedTinyOptions, seed: int) -> list[dict]:
    """Each client's training images (:func:`dirichlet_split`); the clients hold no test images."""
    empty_x, empty_y = data["x_train"][:0], data["y_train"][:0]
    return [{"x_train": data["x_train"][i], "y_train": data["y_train"][i], "x_test": empty_x, "y_test": empty_y}
            for i in dirichlet_split(data["y_train"], o.clients, o.alpha, seed)]


def run(cfg, model: nn.Module, data: dict, ctx):
    """Run ``ctx.options.variant`` federated; returns (the global model, its masks or None for ``dense``)."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise PruneError("Learner fedtiny needs Flower; install it with pip install 'prunekit[federated]'.") from None
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    o = ctx.options
    if o.variant != "dense" and cfg.sparsity <= 0:
        raise PruneError(f"Variant {o.variant!r} needs a sparsity above 0 (--sparsity).")
    prunable(model, cfg.exclude)  # one sentence if --exclude leaves nothing
    shards = client_shards(data, o, cfg.seed)
    if ctx.progress:
        say(f"fedtiny: {o.clients} clients, images per client {[len(s['y_train']) for s in shards]} "
            f"(Dirichlet alpha {o.alpha}); variant {o.variant}, {o.rounds} rounds")
    res = federate(cfg, o, model, shards, (data["x_test"], data["y_test"]), ctx.journey, ctx.progress)
    masks, grid = res["masks"], res["grid"]
    ctx.history.extend(res["rounds"])
    for k in ("dense_acc", "acc_after_prune"):
        if k in res:
            ctx.info[k] = res[k]
    example = data["x_train"][: cfg.batch_size]
    sel_down, sel_up = grid.down.get("0", 0), grid.up.get("0", 0)
    down, up = sum(grid.down.values()), sum(grid.up.values())
    dense_bytes = 4 * sum(v.numel() for v in transported(model).values())
    ctx.info["learn"] = {
        "method": "fedtiny", "variant": o.variant, "clients": o.clients, "rounds": o.rounds,
        "local_epochs": o.local_epochs, "alpha": o.alpha,
        "client_images": [len(s["y_train"]) for s in shards],
        "client_classes": [int(s["y_train"].unique().numel()) for s in shards],
        "selection": res.get("selection"),
        "communication": {"bytes_down": down, "bytes_up": up, "bytes_total": down + up,
                          "selection_down": sel_down, "selection_up": sel_up,
                          "dense_model_bytes": dense_bytes,
                          "per_round": [{"round": r["epoch"], "down": r["bytes_down"], "up": r["bytes_up"]}
                                        for r in res["rounds"]]},
        "client_memory": client_memory(model, masks, example, res.get("topk_max", 0)),
        "client_memory_dense": client_memory(model, None, example),
        "moved": [r["moved"] for r in res["rounds"]],
        "sparsity_per_round": [r["sparsity"] for r in res["rounds"]],
        "test_acc_per_round": [r["test_acc"] for r in res["rounds"]],
    }
    return model, masks


LEARNED.register("fedtiny", run, params=FedTinyOptions,
                 description="federated pruning on Flower (Huang et al. 2023): non-IID clients, adaptive BatchNorm "
                             "selection of the initial mask, progressive prune-and-grow from clients' top-K "
                             "gradients, masked FedAvg; variants dense / prune-after")
