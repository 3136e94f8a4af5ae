"""Reversible patches: each supported layer's ``forward`` is replaced (on the instance) by one that computes its
attention itself (SDPA with an additive float bias; explicit softmax only in the layers whose method reads the
probabilities), reduces the tokens between attention and MLP, and carries the :class:`TokenState` to the next
layer. A forward pre-hook on the model starts a fresh state per call (and reads the padding mask).

Families (``FAMILIES``): Hugging Face BERT-style encoders (BERT, RoBERTa, MiniLM sentence encoders), ViT,
CLIP's vision tower, and ``torch.nn.TransformerEncoderLayer`` (prunekit's own TinyViT).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.masks import apportion
from prunekit.errors import PruneError
from prunekit.tokens import merge as M
from prunekit.tokens.methods import METHODS, Step


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def attend(q, k, v, scale: float, bias, need_probs):
    """(B, H, T, d) each -> ((B, T, H*d), probs or None). ``need_probs``: False (SDPA only), True (the full
    (B, H, T, T) probabilities, explicit softmax) or ``"cls"`` (SDPA, plus the class token's row (B, H, 1, T))."""
    if need_probs == "cls":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d), logits.softmax(-1)
    if need_probs:
        out, probs = _explicit(q, k, v, scale, bias)
    else:
        probs = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d), probs


def _explicit(q, k, v, scale, bias, chunk_bytes: int = 16 << 20):
    """Attention with its probabilities, a few batch rows at a time so each chunk's (H, T, T) logits, softmax and
    product stay in cache (one pass over memory for the probabilities instead of four)."""
    b, h, t, _ = q.shape
    per = max(1, chunk_bytes // max(1, h * t * k.shape[2] * 4))
    qs = q * scale
    outs, probs = [], []
    for i in range(0, b, per):
        logits = qs[i:i + per] @ k[i:i + per].transpose(-1, -2)
        if bias is not None:
            logits += bias if bias.shape[0] == 1 else bias[i:i + per]
        p = logits.softmax(-1)
        outs.append(p @ v[i:i + per])
        probs.append(p)
    if len(outs) == 1:
        return outs[0], probs[0]
    return torch.cat(outs), torch.cat(probs)


# --- one function per family: (layer, x, run) -> x; run.reduce(x, keys, probs) between attention and MLP ---

def _bert(layer, x, run):
    sa = layer.attention.self
    n = sa.num_attention_heads
    q, k, v = _heads(sa.query(x), n), _heads(sa.key(x), n), _heads(sa.value(x), n)
    o, probs = attend(q, k, v, sa.scaling, run.bias(x.dtype), run.need_probs)
    h = layer.attention.output(o, x)  # dense, dropout, LayerNorm(. + x)
    h = run.reduce(h, k, probs)
    return layer.output(layer.intermediate(h), h)


def _vit(layer, x, run):
    att = layer.attention
    n = att.num_attention_heads
    xn = layer.layernorm_before(x)
    q, k, v = _heads(att.q_proj(xn), n), _heads(att.k_proj(xn), n), _heads(att.v_proj(xn), n)
    o, probs = attend(q, k, v, att.scaling, run.bias(x.dtype), run.need_probs)
    h = x + layer.dropout(att.o_proj(o))
    h = run.reduce(h, k, probs)
    return h + layer.dropout(layer.mlp(layer.layernorm_after(h)))


def _vit_legacy(layer, x, run):
    """transformers < 5: ViTLayer with attention.attention.{query,key,value} and attention.output.dense."""
    sa = layer.attention.attention
    n = sa.num_attention_heads
    xn = layer.layernorm_before(x)
    q, k, v = _heads(sa.query(xn), n), _heads(sa.key(xn), n), _heads(sa.value(xn), n)
    o, probs = attend(q, k, v, sa.attention_head_size ** -0.5, run.bias(x.dtype), run.need_probs)
    h = x + layer.attention.output.dense(o)
    h = run.reduce(h, k, probs)
    return layer.output(layer.intermediate(layer.layernorm_after(h)), h)


def _clip(layer, x, run):
    sa = layer.self_attn
    n = sa.num_heads
    xn = layer.layer_norm1(x)
    q, k, v = _heads(sa.q_proj(xn), n), _heads(sa.k_proj(xn), n), _heads(sa.v_proj(xn), n)
    o, probs = attend(q, k, v, sa.scale, run.bias(x.dtype), run.need_probs)
    h = x + sa.out_proj(o)
    h = run.reduce(h, k, probs)
    return h + layer.mlp(layer.layer_norm2(h))


def _torch_encoder(layer, x, run):
    sa = layer.self_attn
    n = sa.num_heads

    def attention(xin):
        q, k, v = F.linear(xin, sa.in_proj_weight, sa.in_proj_bias).chunk(3, dim=-1)
        q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
        o, probs = attend(q, k, v, 1.0 / math.sqrt(q.shape[-1]), run.bias(x.dtype), run.need_probs)
        return layer.dropout1(sa.out_proj(o)), k, probs

    def ff(h):
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(h)))))

    if layer.norm_first:
        o, k, probs = attention(layer.norm1(x))
        h = run.reduce(x + o, k, probs)
        return h + ff(layer.norm2(h))
    o, k, probs = attention(x)
    h = run.reduce(layer.norm1(x + o), k, probs)
    return layer.norm2(h + ff(h))


@dataclass(frozen=True)
class Family:
    name: str
    run: object
    protect: str  # "cls": position 0; "cls+sep": position 0 and the last real token


def family_of(layer: nn.Module) -> Family | None:
    if isinstance(layer, nn.TransformerEncoderLayer):
        return Family("torch-encoder", _torch_encoder, "cls")
    name = type(layer).__name__
    sa = getattr(getattr(layer, "attention", None), "self", None)
    if sa is not None and hasattr(sa, "query") and hasattr(layer, "intermediate") and hasattr(layer, "output"):
        return Family("bert", _bert, "cls+sep")
    if hasattr(layer, "layernorm_before") and hasattr(getattr(layer, "attention", None), "q_proj"):
        return Family("vit", _vit, "cls")
    if hasattr(layer, "layernorm_before") and hasattr(getattr(getattr(layer, "attention", None), "attention", None),
                                                         "query"):
        return Family("vit-legacy", _vit_legacy, "cls")
    if name.startswith("CLIP") and hasattr(layer, "layer_norm1") and hasattr(getattr(layer, "self_attn", None), "q_proj"):
        return Family("clip", _clip, "cls")
    return None


def find_layers(model: nn.Module) -> tuple[list[nn.Module], Family]:
    """The model's encoder layers in order (one family), or one sentence saying why it cannot be patched."""
    root = getattr(model, "vision_model", None) if type(model).__name__ in ("CLIPModel",) else model
    cfg = getattr(model, "config", None)
    if type(model).__name__.startswith("CLIPText") or (cfg is not None and getattr(cfg, "is_decoder", False)):
        raise PruneError(f"{type(model).__name__} is a causal text tower; token merging and pruning are for "
                         "bidirectional encoders (BERT-style, ViT, CLIP vision), never causal text.")
    layers, fams = [], set()
    for mod in root.modules():
        fam = family_of(mod)
        if fam is not None:
            layers.append(mod)
            fams.add(fam)
    if not layers:
        raise PruneError(f"{type(model).__name__} has no layer prunekit.tokens can patch; supported: Hugging Face "
                         "BERT-style encoders, ViT, CLIP vision towers and torch.nn.TransformerEncoderLayer.")
    if len(fams) > 1:
        raise PruneError(f"{type(model).__name__} mixes layer kinds ({', '.join(sorted(f.name for f in fams))}); "
                         "patch one encoder at a time.")
    fam = fams.pop()
    if fam.name == "bert":
        pet = getattr(cfg, "position_embedding_type", "absolute") if cfg is not None else "absolute"
        if pet not in (None, "absolute"):
            raise PruneError(f"position_embedding_type {pet!r} adds relative position scores inside attention, "
                             "which prunekit.tokens cannot read; only absolute position embeddings are supported.")
        if getattr(cfg, "add_cross_attention", False):
            raise PruneError("An encoder with cross-attention cannot be patched; merge tokens in plain encoders.")
    if fam.name == "torch-encoder" and not all(getattr(m.self_attn, "batch_first", False) for m in layers):
        raise PruneError("torch.nn.TransformerEncoderLayer needs batch_first=True for prunekit.tokens.")
    return layers, fam


def reducing_layers(recipe, n_layers: int, evit_layers: bool) -> list[int]:
    """The layers that reduce: ``recipe.layers``, else every layer, or (``evit_layers``: the token-dropping
    methods with ``keep``, so that every dropping method, baselines included, prunes at the same depths) EViT's
    L/4, L/2 and 3L/4."""
    if recipe.layers is not None:
        bad = [i for i in recipe.layers if i >= n_layers]
        if bad:
            raise PruneError(f"layers {bad} do not exist; the model has {n_layers} layers (0 to {n_layers - 1}).")
        return sorted(recipe.layers)
    if evit_layers and recipe.keep is not None:
        return sorted({max(0, min(n_layers - 1, n_layers * k // 4)) for k in (1, 2, 3)})
    return list(range(n_layers))


def plan(recipe, n_layers: int, tokens: int, evit_layers: bool) -> list[int]:
    """Tokens to remove at each layer for an input of ``tokens`` tokens (the layers cap it at run time)."""
    at = reducing_layers(recipe, n_layers, evit_layers)
    out = [0] * n_layers
    if recipe.method == "none" or not at:
        return out
    k = len(at)
    if recipe.flops is not None:
        return _plan_flops(recipe, n_layers, tokens, at)
    if recipe.r is not None:
        if recipe.schedule == "constant" or k == 1:
            per = [recipe.r] * k
        else:  # ToMe's (r, -1): 2r down to 0, evenly spaced
            per = [int(2 * recipe.r - 2 * recipe.r * i / (k - 1)) for i in range(k)]
    else:
        left, per = tokens, []
        for i in range(k):
            target = math.ceil(tokens * recipe.keep ** ((i + 1) / k))
            per.append(max(0, left - target))
            left -= per[-1]
        if recipe.schedule == "decreasing":
            total = sum(per)
            per = apportion(total, [k - i for i in range(k)])
    for i, n in zip(at, per):
        out[i] = int(n)
    return out


def flops_fraction(removals: list[int], tokens: int) -> float:
    """Estimated share of the dense linear-layer FLOPs: per layer 4 d^2 per token entering (q, k, v, o) and
    8 d^2 per token after its reduction (the MLP), each reduction capped at half the tokens."""
    t, cost = tokens, 0.0
    for n in removals:
        after = t - min(n, t // 2)
        cost += 4 * t + 8 * after
        t = after
    return cost / (12 * tokens * len(removals))


def _plan_flops(recipe, n_layers: int, tokens: int, at: list[int]) -> list[int]:
    for r in range(tokens // 2 + 1):
        out = [r if i in at else 0 for i in range(n_layers)]
        if flops_fraction(out, tokens) <= recipe.flops:
            return out
    return [tokens // 2 if i in at else 0 for i in range(n_layers)]


@dataclass
class Run:
    """What one forward carries from layer to layer."""

    handle: object
    state: M.TokenState | None = None
    removals: list[int] = field(default_factory=list)  # per layer, the batch's largest
    rows: torch.Tensor | None = None  # (B, layers): each row's own plan (padded batches), else None
    layer: int = 0
    need_probs: bool | str = False
    tokens_in: list[int] = field(default_factory=list)
    reduced: bool = False  # a layer has run the patched path (sizes may differ from 1)

    def bias(self, dtype):
        h = self.handle
        return self.state.bias(h.proportional, dtype)

    def reduce(self, x, keys, probs):
        h = self.handle
        n = self.removals[self.layer]
        if n <= 0:
            return x
        rows = None if self.rows is None else self.rows[:, self.layer]
        step = Step(x, keys, probs, self.state, n, self.layer, len(h.layers), h.recipe, h.generator, rows)
        x, self.state = h.method(step)
        return x


class Handle:
    """A patched model: ``remove()`` restores it; ``state`` is the last forward's final token state (sizes,
    padding, ``where`` each original position went); ``tokens`` the tokens entering each layer last time."""

    def __init__(self, model, recipe, layers, family):
        self.model, self.recipe, self.layers, self.family = model, recipe, layers, family
        entry = METHODS.get(recipe.method)
        self.method = entry.impl
        self.needs_probs = entry.meta.get("needs_probs") or False
        merges = self.merges = bool(entry.meta.get("merges"))
        self.proportional = merges if recipe.proportional_attention is None else bool(recipe.proportional_attention)
        self.generator = torch.Generator().manual_seed(recipe.seed)
        self.state: M.TokenState | None = None
        self.tokens: list[int] = []
        self._run: Run | None = None
        self._mask = None
        self._saved = []
        self._hooks = []
        self._sig = None
        self.active = False
        self.enabled = True  # False: every layer runs its stock forward (A/B timing without re-patching)

    # the pre-hook on the model: a fresh run per forward, the padding mask if the caller passed one
    def _start(self, module, args, kwargs):
        self._mask = None
        if not self.enabled:
            return
        m = kwargs.get("attention_mask")
        if m is None and args:
            if self._sig is None:
                self._sig = inspect.signature(module.forward)
            try:
                m = self._sig.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                m = None
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            self._mask = m
        self._run = None
        self.generator.manual_seed(self.recipe.seed)

    def _layer_forward(self, index: int, layer, hidden_states, *args, **kwargs):
        if not self.enabled:
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        if isinstance(hidden_states, tuple):
            hidden_states = hidden_states[0]
        if layer.training:
            raise PruneError("prunekit.tokens patches models for inference (its attention has no dropout); call "
                             "model.eval() or handle.remove() before training.")
        b, t, _ = hidden_states.shape
        if index == 0 or self._run is None:
            valid = None
            if self._mask is not None and tuple(self._mask.shape) == (b, t):
                valid = self._mask.bool()
            pad = kwargs.get("src_key_padding_mask")
            if isinstance(pad, torch.Tensor) and tuple(pad.shape) == (b, t):
                valid = ~pad.bool()
            protected = torch.zeros(b, t, dtype=torch.bool, device=hidden_states.device)
            protected[:, 0] = True
            if self.family.protect == "cls+sep":
                last = (valid.long().sum(-1) - 1) if valid is not None else torch.full((b,), t - 1)
                protected[torch.arange(b), last.clamp_min(0).to(protected.device)] = True
            st = M.TokenState.start(b, t, valid=valid, protected=protected, trace=self.recipe.unmerge,
                                    device=hidden_states.device)
            self._run = self._new_run(st, t)
        run = self._run
        run.layer = index
        run.need_probs = self.needs_probs if run.removals[index] > 0 else False
        run.tokens_in.append(run.state.tokens)
        if run.removals[index] == 0 and run.state.tokens == t and not run.reduced:
            out = type(layer).forward(layer, hidden_states, *args, **kwargs)  # nothing reduced yet: the stock layer
            if isinstance(out, tuple):
                out = out[0]
        else:
            run.reduced = True
            out = self.family.run(layer, hidden_states, run)
        if index == len(self.layers) - 1:
            self.state, self.tokens = run.state, run.tokens_in
            self._run = None
            if self.recipe.unmerge and run.state.where is not None and run.state.tokens != run.state.where.shape[1]:
                out, _ = M.unmerge(out, run.state.where)
        return out

    def _new_run(self, st: M.TokenState, t: int) -> Run:
        """The removals of this forward: per layer for the padded length; with padding, each row's own plan
        for its real length too (a short text in a batch of long ones merges as it would alone)."""
        n_layers = len(self.layers)
        short = self.recipe.min_tokens

        def plan_for(length: int) -> list[int]:
            if length < short:
                return [0] * n_layers
            return plan(self.recipe, n_layers, length, not self.merges)

        if bool(st.valid.all()):
            return Run(self, st, plan_for(t))
        lengths = st.valid.sum(-1).tolist()
        cache = {L: plan_for(int(L)) for L in set(lengths)}
        removals = [max(c[i] for c in cache.values()) for i in range(n_layers)]
        rows = torch.tensor([cache[L] for L in lengths], dtype=torch.long)
        return Run(self, st, removals, rows=rows)

    def patch(self) -> Handle:
        import functools

        for i, layer in enumerate(self.layers):
            self._saved.append(layer.__dict__.get("forward"))
            layer.forward = functools.partial(self._layer_forward, i, layer)
        self._hooks.append(self.model.register_forward_pre_hook(self._start, with_kwargs=True))
        self.model._prunekit_tokens = self
        self.active = True
        return self

    def remove(self) -> None:
        """Restore the model exactly as it was (idempotent)."""
        if not self.active:
            return
        for layer, saved in zip(self.layers, self._saved):
            if saved is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = saved
        for h in self._hooks:
            h.remove()
        self._hooks, self._saved = [], []
        self.model.__dict__.pop("_prunekit_tokens", None)
        self.active = False

    def covered(self) -> torch.Tensor | None:
        """(B, T0) bool of the last forward: the original positions still represented (False: dropped)."""
        return None if self.state is None or self.state.where is None else self.state.where >= 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
