"""Recovery: a short training run after pruning that keeps every pruned weight at exactly zero.

``recover(model, recovery, token_batches) -> (model, stats)`` trains the pruned model in place on token
windows ``[n, seqlen]`` with next-token cross-entropy. The mask is the set of exact zeros of the target layers
(every linear layer inside the decoder blocks) when training starts; it holds again when ``recover`` returns.

Methods (``prunekit.recipe.Recovery.method``):

* ``perp``: norm weights, all biases and LoRA adapters on the block linear layers (PERP, Zimmer et al. 2023).
* ``lora``: LoRA adapters only.
* ``full``: every weight of the block linear layers, norms and biases; the pruned weights' gradients are
  zeroed before each AdamW step and the weights re-zeroed after it.
* ``distill``: like ``perp``, with loss ``(1 - w) * LM + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
  against the dense ``teacher``.

``Recovery.lora_ranks`` ``importance`` (CFSP's importance-guided LoRA, IG-LoRA): the LoRA rank of each decoder
block's adapters is in proportion to the block's coarse importance (:func:`prunekit.structure.similarity.
block_importance` of its angular distance, measured on the first training windows), at least 1, with the same total
rank over the blocks as ``lora_rank`` everywhere; ``stats["lora_ranks"]`` lists them.

``Recovery.select`` / ``keep`` first choose which windows to train on (:mod:`prunekit.train.select`: all, random,
paser); the number of steps stays ``Recovery.steps`` whatever the share.

The LoRA adapters are masked while they train (the layer computes with ``W + M * (B @ A) * scaling``, M = 1 where
the weight is kept; "MaskLoRA" in the PERP paper), so that merging them (peft ``merge_and_unload``) and zeroing the
pruned weights again gives exactly the model that was trained. Afterwards the model is the same object of the same
class, with no peft modules left, in eval mode, with its ``requires_grad`` flags as they were. If training stops
with an exception (Ctrl-C included) the exception propagates and the model is put back as it was before.
"""

from __future__ import annotations

import re
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.arch import adapter_for, target_layers
from prunekit.checks import check_finite
from prunekit.core.loop import kd_loss, make_optimizer, make_schedule, train_loop
from prunekit.core.masks import Masks, apportion
from prunekit.errors import PruneError
from prunekit.core.registry import Registry
from prunekit.recipe import Recovery
from prunekit.train.select import check_selection, select_windows

RECOVERY_METHODS = Registry("recovery method")
RECOVERY_METHODS.register_names((
    ("perp", "norms, biases and masked LoRA adapters (PERP)"),
    ("lora", "masked LoRA adapters only"),
    ("full", "every weight, the masks attached"),
    ("distill", "like perp, with a KL term to the dense teacher"),
))
WARMUP_FRACTION = 0.1  # linear warmup over the first 10% of steps, then cosine decay
MIN_LR_FACTOR = 0.1  # the cosine ends at 10% of the recipe's lr
MAX_GRAD_NORM = 1.0
_ADAPTER = "default"


class PruningMasks:
    """The block linear layers ``[(module name, module)]`` and their :class:`~prunekit.core.masks.Masks` (True = kept,
    keyed by ``"<module name>.weight"``, in the layout of the weight)."""

    def __init__(self, layers: list[tuple[str, nn.Module]], masks: Masks):
        self.layers, self.masks = layers, masks

    def removed(self, name: str) -> torch.Tensor:
        return ~self.masks[f"{name}.weight"]


def make_recovery(**fields) -> Recovery:
    """``Recovery(**fields)`` whose validation errors are one-sentence :class:`PruneError` s."""
    return Recovery.make(**fields)


def pruning_masks(model: nn.Module, structured: bool = False) -> PruningMasks:
    """The masks of every block linear layer (kept = not exactly zero); PruneError when nothing is pruned, unless
    ``structured``: a structurally pruned model lost whole rows and columns instead, so it may have no zeros."""
    adapter = adapter_for(model)
    flat = [t for block in target_layers(model, adapter) for t in block]
    masks = Masks.from_zeros(model, [f"{name}.weight" for name, _ in flat])
    if not structured and masks.kept() == masks.numel():
        raise PruneError(
            f"This {type(model).__name__} has no pruned weights (no zeros in its block layers); prune it first "
            "with `prunekit prune` or prunekit.prune() and recover the pruned model."
        )
    return PruningMasks(flat, masks)


def _check_tokens(token_batches, model: nn.Module) -> torch.Tensor:
    if not (isinstance(token_batches, torch.Tensor) and token_batches.dim() == 2):
        raise PruneError("token_batches must be a 2-D tensor of token ids [samples, seqlen].")
    if token_batches.dtype.is_floating_point or token_batches.dtype == torch.bool or token_batches.is_complex():
        raise PruneError(f"token_batches must hold integer token ids, not {token_batches.dtype}.")
    n, seqlen = token_batches.shape
    if n == 0 or seqlen < 2:
        raise PruneError(f"token_batches of shape {tuple(token_batches.shape)} is too small; give at least one sequence of 2 or more tokens.")
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(token_batches.min()), int(token_batches.max())
    if lo < 0 or hi >= vocab:
        raise PruneError(f"token_batches holds ids in [{lo}, {hi}] but the model's vocabulary has {vocab} tokens; tokenize with the model's own tokenizer.")
    return token_batches.long()


def _check_teacher(rec: Recovery, teacher, model: nn.Module) -> None:
    if rec.method != "distill":
        if teacher is not None and rec.select != "paser":
            raise PruneError(f"A teacher is only used by recovery method 'distill' and by select 'paser', not by method "
                             f"{rec.method!r} with select {rec.select!r}; drop the teacher or use one of those.")
        if teacher is None:
            return
    if teacher is None:
        raise PruneError("Recovery method 'distill' needs the dense model as teacher; pass teacher= (CLI: --teacher MODEL).")
    if teacher is model:
        raise PruneError("The teacher is the model being recovered; pass a separate dense copy as teacher.")
    vt = getattr(getattr(teacher, "config", None), "vocab_size", None)
    vm = getattr(getattr(model, "config", None), "vocab_size", None)
    if vt != vm:
        raise PruneError(f"The teacher's vocabulary ({vt} tokens) differs from the model's ({vm}); distill from the dense model it was pruned from.")


def _index_stream(n: int, batch_size: int, gen: torch.Generator):
    """Mini-batches of row indices that cycle over seeded permutations of ``range(n)``."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while buf.numel() < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def _norm_and_bias_params(model: nn.Module) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for mod in model.modules():
        if "Norm" in type(mod).__name__:
            out.extend(p for _, p in mod.named_parameters(recurse=False))
    out.extend(p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias")
    return out


def _masked_lora_forward(self, x, *args, **kwargs):
    """LoRA layer forward with the adapter's update masked: base layer computed with W + keep * delta."""
    base = self.base_layer
    delta = self.get_delta_weight(_ADAPTER).to(base.weight.dtype).masked_fill(self._prunekit_mask, 0.0)
    return torch.func.functional_call(base, {"weight": base.weight + delta}, (x, *args), kwargs)


IMPORTANCE_WINDOWS = 8  # lora_ranks importance: the training windows the blocks' distances are measured on


def block_ranks(importance: list[float], rank: int) -> list[int]:
    """IG-LoRA: integer ranks in proportion to ``importance``, each at least 1, adding up to ``rank`` per block."""
    n = len(importance)
    return [1 + q for q in apportion(rank * n - n, importance)]


def importance_ranks(model: nn.Module, rec: Recovery, ids: torch.Tensor, device) -> list[int]:
    """Per decoder block, its LoRA rank under ``rec.lora_ranks`` (uniform: ``rec.lora_rank`` each)."""
    adapter = adapter_for(model)
    n = len(adapter.blocks(model))
    if rec.lora_ranks == "uniform":
        return [rec.lora_rank] * n
    from prunekit.structure.similarity import block_distances, block_importance

    was = model.training
    model.eval()
    try:
        d = block_distances(adapter, model, ids[:IMPORTANCE_WINDOWS], rec.batch_size, device, desc="IG-LoRA ranks")
    finally:
        model.train(was)
    return block_ranks(block_importance(d), rec.lora_rank)


def _rank_pattern(model: nn.Module, masks: PruningMasks, ranks: list[int]) -> dict[str, int]:
    """peft's ``rank_pattern``: every block layer's name -> its block's rank."""
    adapter = adapter_for(model)
    where = {id(m): i for i, b in enumerate(adapter.blocks(model)) for m in b.modules()}
    return {name: ranks[where[id(mod)]] for name, mod in masks.layers if id(mod) in where}


def _attach_lora(model: nn.Module, masks: PruningMasks, rec: Recovery, ranks: list[int] | None = None):
    """Inject peft LoRA adapters into every block linear layer (in place); returns the peft wrapper. ``ranks``:
    per decoder block (default ``rec.lora_rank`` everywhere)."""
    from peft import LoraConfig, get_peft_model

    fan_in_fan_out = any(type(mod).__name__ == "Conv1D" for _, mod in masks.layers)  # GPT-2 stores [in, out]
    pattern = {}
    if ranks is not None:
        pattern = {re.escape(k): v for k, v in _rank_pattern(model, masks, ranks).items() if v != rec.lora_rank}
    cfg = LoraConfig(
        r=rec.lora_rank,
        rank_pattern=pattern,
        lora_alpha=rec.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=[name for name, _ in masks.layers],
        fan_in_fan_out=fan_in_fan_out,
    )
    return get_peft_model(model, cfg)


def _mask_adapters(model: nn.Module, masks: PruningMasks) -> list[nn.Parameter]:
    """Make every LoRA layer train its update masked; returns the adapters' parameters."""
    from peft.tuners.lora import LoraLayer

    by_name = {name: masks.removed(name) for name, _ in masks.layers}
    lora_params: list[nn.Parameter] = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and name in by_name:
            mod._prunekit_mask = by_name[name]
            mod.forward = MethodType(_masked_lora_forward, mod)
            lora_params.extend(mod.lora_A[_ADAPTER].parameters())
            lora_params.extend(mod.lora_B[_ADAPTER].parameters())
    if len(lora_params) != 2 * len(masks.layers):
        raise PruneError(f"peft placed LoRA adapters on {len(lora_params) // 2} of {len(masks.layers)} block layers; this model's layers are not supported by peft LoRA.")
    return lora_params


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def recover(
    model: nn.Module,
    recovery: Recovery | dict | None,
    token_batches: torch.Tensor,
    *,
    teacher: nn.Module | None = None,
    tokenizer=None,
    embeddings=None,
    structured: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Train the pruned ``model`` in place as ``recovery`` says; every pruned weight stays exactly zero.

    ``token_batches``: int64 token ids ``[n, seqlen]`` (e.g. :func:`prunekit.batches.calibration_batches`),
    cycled over in seeded mini-batches of ``recovery.batch_size``; with ``recovery.select`` random or paser only the
    selected share of them (:func:`prunekit.train.select.select_windows`; paser needs ``tokenizer`` to embed the
    windows' text, or their ``embeddings [n, d]``). ``teacher``: the dense model, needed by method ``distill`` and
    select ``paser``. ``structured``: the model was structurally pruned (smaller shapes, maybe no zeros);
    zeros it has are still kept, and a model without zeros is accepted. Returns ``(model, stats)`` with stats ``steps``, ``loss_first`` / ``loss_last``
    (mean training loss over the first / last 10% of steps), ``seconds`` and ``trainable_params``, and
    ``selection`` (which windows were trained on and why, see :mod:`prunekit.train.select`).
    """
    if isinstance(recovery, Recovery):
        rec = recovery
    elif recovery is None or isinstance(recovery, dict):
        rec = make_recovery(**(recovery or {}))
    else:
        raise PruneError(f"recovery must be a Recovery or a dict of its fields, not {type(recovery).__name__}.")
    ids = _check_tokens(token_batches, model)
    check_finite(model, "The model to recover")
    _check_teacher(rec, teacher, model)
    check_selection(rec, teacher, tokenizer, embeddings, ids.shape[0])
    masks = pruning_masks(model, structured)
    selection = select_windows(model, rec, ids, teacher=teacher, tokenizer=tokenizer, embeddings=embeddings,
                               progress=progress)
    ids = ids[selection.indices]

    device = next(model.parameters()).device
    flags = [(p, p.requires_grad) for p in model.parameters()]
    plain: list[nn.Parameter] = []  # trained parameters that are not LoRA adapters
    if rec.method != "lora":
        plain.extend(_norm_and_bias_params(model))
    if rec.method == "full":
        plain.extend(mod.weight for _, mod in masks.layers)
    plain = _unique(plain)
    saved = [(p, p.detach().clone()) for p in plain]  # put back if training fails or is interrupted
    teacher_training = teacher.training if teacher is not None else None

    peft_model, ok = None, False
    stats: dict = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        lora_params: list[nn.Parameter] = []
        ranks = None
        if rec.method != "full":
            ranks = importance_ranks(model, rec, ids, device)
            with torch.random.fork_rng(devices=[]):  # seeded adapter init; the caller's RNG is left alone
                torch.manual_seed(rec.seed)
                peft_model = _attach_lora(model, masks, rec, ranks)
            lora_params = _mask_adapters(model, masks)
        params = _unique(plain + lora_params)
        for p in params:
            p.requires_grad_(True)
        stats = _train(model, rec, ids, params, masks.masks if rec.method == "full" else None, teacher, device, progress)
        stats["selection"] = selection.info
        if rec.lora_ranks == "importance" and ranks is not None:
            stats["lora_ranks"] = ranks
        for p in params:  # the last step can diverge after its loss was finite
            if not bool(torch.isfinite(p).all()):
                raise PruneError(
                    f"Recovery diverged: trained weights are not finite after step {rec.steps}; lower the learning "
                    f"rate (now {rec.lr:g})."
                )
        ok = True
    finally:
        if peft_model is not None:
            if ok:
                peft_model.merge_and_unload()
            else:
                peft_model.unload()
        with torch.no_grad():
            if not ok:
                for p, old in saved:
                    p.copy_(old)
            masks.masks.apply(model)
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        model.eval()
        if teacher is not None:
            teacher.train(teacher_training)
    return model, stats


def _train(model, rec: Recovery, ids, params, full_masks: Masks | None, teacher, device, progress: bool) -> dict:
    """The shared training loop over seeded mini-batches of ``ids``: AdamW, linear warmup then cosine decay,
    gradient clipping. ``full_masks``: every weight trains, the masks attached (removed weights get no gradient,
    hence no AdamW moment, and are re-zeroed after each step)."""
    opt = make_optimizer(params, "adamw", rec.lr, weight_decay=0.0)
    sched = make_schedule(opt, "warmup-cosine", rec.steps, warmup=max(1, round(WARMUP_FRACTION * rec.steps)),
                          min_factor=MIN_LR_FACTOR)
    stream = _index_stream(ids.shape[0], rec.batch_size, torch.Generator().manual_seed(rec.seed))
    distill = rec.method == "distill"
    if distill:
        teacher.eval()
        teacher_device = next(teacher.parameters()).device
    w = rec.distill_weight

    def loss_fn(model, rows):
        x = ids[rows].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        if distill:
            with torch.no_grad():
                t_logits = teacher(input_ids=x.to(teacher_device), use_cache=False).logits[:, :-1].float().to(device)
            loss = (1.0 - w) * loss + w * kd_loss(logits, t_logits, rec.temperature)
        return loss, None

    res = train_loop(
        model, opt, [(next(stream) for _ in range(rec.steps))], loss_fn, scheduler=sched, masks=full_masks,
        clip=(params, MAX_GRAD_NORM), total=rec.steps, desc=f"recover {rec.method}", progress=progress,
        diverged=lambda step, v: f"Recovery diverged (loss {v} at step {step}); lower the learning rate (now {rec.lr:g}).",
    )
    return res.summary(sum(p.numel() for p in params))
