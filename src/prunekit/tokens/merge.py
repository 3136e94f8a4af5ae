"""The sequence-reduction math, as pure functions on tensors: ToMe's bipartite soft matching (size-weighted merges,
sources traced to the original positions), token dropping by index, and the importance scores of the pruning
methods (Zero-TPrune's weighted PageRank, attention to the class token).

Every reduction carries the same :class:`TokenState` along the layers: ``size`` (how many original tokens a row
stands for), ``valid`` (False: padding), ``protected`` (class / separator tokens: never merged, never dropped) and
optionally ``where`` (B, T0): the row that now holds each original position (-1: dropped), so a caller can unmerge
(``source`` gives it as ToMe's (B, T, T0) 0/1 matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = float("-inf")


@dataclass
class TokenState:
    size: torch.Tensor  # (B, T, 1) float: original tokens per row
    valid: torch.Tensor  # (B, T) bool: False for padding
    protected: torch.Tensor  # (B, T) bool: never merged or dropped
    where: torch.Tensor | None = None  # (B, T0) long: the row holding each original position, -1 dropped
    padded: bool | None = None  # any padding (None: read from ``valid``); False lets the hot path skip its masks
    dropped: bool = False  # a pruning method dropped tokens (``where`` may hold -1)
    n_protected: int | None = None  # the most protected rows in any batch row (None: read from ``protected``)

    def __post_init__(self):
        if self.padded is None:
            self.padded = not bool(self.valid.all())
        if self.n_protected is None:
            self.n_protected = int(self.protected.sum(-1).max()) if self.protected.numel() else 0

    @classmethod
    def start(cls, batch: int, tokens: int, *, valid=None, protected=None, trace: bool = False, device=None,
              dtype=torch.float32) -> TokenState:
        valid = torch.ones(batch, tokens, dtype=torch.bool, device=device) if valid is None else valid.bool()
        protected = (torch.zeros(batch, tokens, dtype=torch.bool, device=device) if protected is None
                     else protected.bool())
        where = torch.arange(tokens, device=device).expand(batch, -1).contiguous() if trace else None
        return cls(torch.ones(batch, tokens, 1, dtype=dtype, device=device), valid, protected, where)

    @property
    def source(self) -> torch.Tensor | None:
        """ToMe's source matrix (B, T, T0): 1 where row t holds original position t0."""
        if self.where is None:
            return None
        b, t0 = self.where.shape
        s = torch.zeros(b, self.tokens + 1, t0, dtype=self.size.dtype, device=self.size.device)
        s.scatter_(1, torch.where(self.where < 0, self.tokens, self.where)[:, None, :], 1.0)
        return s[:, : self.tokens]

    def moved(self, row_map: torch.Tensor) -> torch.Tensor | None:
        """``where`` after the rows moved by ``row_map`` (B, T): old row -> new row (-1: dropped)."""
        if self.where is None:
            return None
        if not self.dropped:
            return row_map.gather(1, self.where)
        new = row_map.gather(1, self.where.clamp_min(0))
        return torch.where(self.where < 0, -1, new)

    @property
    def tokens(self) -> int:
        return self.size.shape[1]

    def bias(self, proportional: bool, dtype=None) -> torch.Tensor | None:
        """The additive attention bias over keys, (B, 1, 1, T): log(size) (proportional attention) and -inf on
        padding; None when it would be all zeros."""
        b = None
        if proportional:
            b = self.size[..., 0].log()
        if self.padded:
            pad = torch.zeros(self.valid.shape, dtype=self.size.dtype, device=self.size.device)
            pad.masked_fill_(~self.valid, torch.finfo(self.size.dtype).min)
            b = pad if b is None else b + pad
        if b is None:
            return None
        return b[:, None, None, :].to(dtype or b.dtype)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) rows idx (B, k) -> (B, k, ...)."""
    shape = idx.shape + x.shape[2:]
    return x.gather(1, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


def halves(x: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The rows of sets A and B of ``x`` (B, T, ...): even and odd positions, or the positions ``split`` = (a_idx,
    b_idx) (1-D, every position in exactly one; ToMe for Stable Diffusion's strided destinations)."""
    if split is None:
        return x[:, ::2], x[:, 1::2]
    return x[:, split[0]], x[:, split[1]]


class Merge:
    """One layer's bipartite matching: ``apply(x, reduce)`` merges any (B, T, ...) tensor the same way; the output
    rows are the unmerged A rows (in their original order) followed by the B rows. ``split``: the positions of A
    and B when they are not the even / odd ones."""

    def __init__(self, unm_idx, src_idx, dst_idx, t: int, split=None):
        self.unm_idx, self.src_idx, self.dst_idx, self.t = unm_idx, src_idx, dst_idx, t
        self.split = split

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def apply(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        a, b = halves(x, self.split)
        if x.dim() == 3:  # the hot path: one expanded index per tensor
            c = x.shape[-1]
            unm = a.gather(1, self.unm_idx[..., None].expand(-1, -1, c))
            idx = self.src_idx[..., None].expand(-1, -1, c)
            src = a.gather(1, idx)
            b = b.scatter_reduce(1, self.dst_idx[..., None].expand(-1, -1, c), src, reduce=reduce, include_self=True)
            return torch.cat([unm, b], 1)
        unm = _gather_rows(a, self.unm_idx)
        src = _gather_rows(a, self.src_idx)
        idx = self.dst_idx.reshape(*self.dst_idx.shape, *([1] * (x.dim() - 2))).expand(src.shape)
        b = b.scatter_reduce(1, idx, src, reduce=reduce, include_self=True)
        return torch.cat([unm, b], 1)

    def follow(self, flags: torch.Tensor) -> torch.Tensor:
        """A per-row flag (B, T) after the merge, for flags a merge never mixes (padding merges only into padding,
        protected rows never merge): the unmerged A rows' own, then B's."""
        fa, fb = halves(flags, self.split)
        return torch.cat([fa.gather(1, self.unm_idx), fb], 1)

    def row_map(self) -> torch.Tensor:
        """(B, T): the output row of every input row."""
        b, n_unm = self.unm_idx.shape
        if self.split is None:
            ta, tb = (self.t + 1) // 2, self.t // 2
        else:
            ta, tb = len(self.split[0]), len(self.split[1])
        dev = self.unm_idx.device
        a_map = torch.empty(b, ta, dtype=torch.long, device=dev)
        a_map.scatter_(1, torch.cat([self.unm_idx, self.src_idx], 1),
                       torch.cat([torch.arange(n_unm, device=dev).expand(b, -1), self.dst_idx + n_unm], 1))
        b_map = torch.arange(n_unm, n_unm + tb, device=dev).expand(b, -1)
        if self.split is not None:
            out = torch.empty(b, self.t, dtype=torch.long, device=dev)
            out[:, self.split[0]] = a_map
            out[:, self.split[1]] = b_map
            return out
        if ta == tb:
            return torch.stack([a_map, b_map], -1).reshape(b, self.t)
        return torch.cat([torch.stack([a_map[:, :tb], b_map], -1).reshape(b, 2 * tb), a_map[:, tb:]], 1)

    def state(self, st: TokenState, size: torch.Tensor | None = None) -> TokenState:
        size = self.apply(st.size, "sum") if size is None else size
        valid = self.follow(st.valid) if st.padded else st.valid[:, : size.shape[1]]
        where = None if st.where is None else st.moved(self.row_map())
        return TokenState(size, valid, self.follow(st.protected), where, st.padded, st.dropped, st.n_protected)

    def wavg(self, x: torch.Tensor, st: TokenState) -> tuple[torch.Tensor, TokenState]:
        """Size-weighted average of the merged rows of ``x`` and the state after the merge."""
        if x.dtype == st.size.dtype and x.dim() == 3:  # one pass: the sizes ride along as the last channel
            out = self.apply(torch.cat([x * st.size, st.size], -1), "sum")
            size = out[..., -1:]
            return out[..., :-1] / size, self.state(st, size.contiguous())
        new = self.state(st)
        merged = self.apply(x * st.size.to(x.dtype), "sum") / new.size.to(x.dtype)
        return merged, new


def _demote_beyond(scores: torch.Tensor, real: torch.Tensor, budget: torch.Tensor, low: float) -> torch.Tensor:
    """``scores`` (B, N) with each row's real entries beyond its ``budget`` best set to ``low``."""
    s = scores.masked_fill(~real, float("-inf"))
    rank = s.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = best
    return torch.where(real & (rank >= budget[:, None]), torch.full_like(scores, low), scores)


def bipartite_soft_matching(metric: torch.Tensor, r: int, st: TokenState | None = None,
                            per_row: torch.Tensor | None = None, split=None) -> Merge | None:
    """ToMe's matching on ``metric`` (B, T, C; cosine similarity): tokens alternate into sets A (even) and B (odd)
    (or ``split`` = (a_idx, b_idx) gives the positions of A and B), each A token's most similar B token is its
    edge, the ``r`` most similar edges merge. Protected tokens are never merged and padding only merges into
    padding (after every real edge); ``r`` shrinks where fewer allowed edges exist. None: nothing merges."""
    t = metric.shape[1]
    r = min(int(r), t // 2 if split is None else len(split[0]))
    if r <= 0:
        return None
    with torch.no_grad():
        m = metric.float()
        m = m / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(1e-12)
        ma, mb = halves(m, split)
        scores = ma @ mb.transpose(1, 2)
        limited = True
        if st is not None:
            if st.padded:
                va, vb = halves(st.valid, split)
                # padding merges only into padding, and only after every real edge (a padded row merges its real
                # tokens as it would alone)
                scores.masked_fill_(~va[:, :, None] & ~vb[:, None, :], -2.0)
                scores.masked_fill_(va[:, :, None] != vb[:, None, :], NEG)
            pa, pb = halves(st.protected, split)
            scores.masked_fill_(pa[:, :, None], NEG)
            scores.masked_fill_(pb[:, None, :], NEG)
            # without padding, every unprotected A token has an edge when an unprotected B token exists
            if not st.padded and per_row is None:
                limited = not (r + st.n_protected <= scores.shape[1] and st.n_protected < scores.shape[2])
        else:
            limited = False
        node_max, node_idx = scores.max(dim=-1)
        if per_row is not None and st is not None:
            real = node_max > -1.5  # a real A token with a real partner (padding pairs score -2)
            node_max = _demote_beyond(node_max, real, per_row.to(node_max.device), -3.0)
        if limited:
            allowed = int((node_max > NEG).sum(-1).min())
            r = min(r, allowed)
            if r <= 0:
                return None
        order = node_max.argsort(dim=-1, descending=True, stable=True)
        src_idx = order[:, :r]
        unm_idx = order[:, r:].sort(dim=-1).values
        dst_idx = node_idx.gather(1, src_idx)
    return Merge(unm_idx, src_idx, dst_idx, t, split)


def keep_rows(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    return _gather_rows(x, keep_idx)


def keep_state(st: TokenState, keep_idx: torch.Tensor) -> TokenState:
    where = None
    if st.where is not None:
        b, k = keep_idx.shape
        row_map = torch.full((b, st.tokens), -1, dtype=torch.long, device=keep_idx.device)
        row_map.scatter_(1, keep_idx, torch.arange(k, device=keep_idx.device).expand(b, -1))
        where = st.moved(row_map)
    return TokenState(keep_rows(st.size, keep_idx), keep_rows(st.valid, keep_idx), keep_rows(st.protected, keep_idx),
                      where, st.padded, True, st.n_protected)


def keep_top(scores: torch.Tensor, n_remove: int, st: TokenState,
             per_row: torch.Tensor | None = None) -> torch.Tensor | None:
    """Row indices (B, T - n, in order) keeping all but the ``n_remove`` lowest-scoring tokens. Protected tokens
    are always kept; padding goes first. ``per_row`` (B,): how many real tokens each row drops (the rest of its
    ``n_remove`` is padding while it has some). ``n_remove`` shrinks to what every row can drop; None: nothing
    to drop."""
    t = scores.shape[1]
    s = scores.float().clone()
    s.masked_fill_(st.protected, float("inf"))
    droppable = int((~st.protected).sum(-1).min())
    n = min(int(n_remove), droppable, t - 1)
    if n <= 0:
        return None
    if per_row is not None:
        real = st.valid & ~st.protected
        low = s.masked_fill(~real, float("inf"))
        rank = low.argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = least important real token
        first = real & (rank < per_row.to(s.device)[:, None])
        # the row's budget of real tokens first, then padding, then the other real tokens by score
        s.masked_fill_(~st.valid & ~st.protected, -2e30)
        s.masked_fill_(first, -3e30)
    else:
        s.masked_fill_(~st.valid & ~st.protected, NEG)
    order = s.argsort(dim=-1, descending=True, stable=True)
    return order[:, : t - n].sort(dim=-1).values


def head_average(probs: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, T, T) attention probabilities averaged over the heads (over ``heads`` (B, H) weights when given)."""
    if heads is None:
        return probs.mean(1)
    w = heads / heads.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("bhij,bh->bij", probs, w)


def pagerank(attn: torch.Tensor, iterations: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-TPrune's weighted PageRank on the attention graph ``attn`` (B, T, T; row i = how query i spreads its
    attention): s <- A^T s from the uniform distribution over the real tokens, ``iterations`` times. A token is
    important when important tokens attend to it."""
    b, t, _ = attn.shape
    a = attn.float()
    if valid is None:
        s = torch.full((b, t), 1.0 / t, device=attn.device)
    else:
        v = valid.float()
        s = v / v.sum(-1, keepdim=True)
    for _ in range(int(iterations)):
        s = torch.einsum("bij,bi->bj", a, s)
        if valid is not None:
            s = s * v
    return s


def cls_attention(probs: torch.Tensor) -> torch.Tensor:
    """EViT's score: the attention the class token (row 0) gives each token, averaged over heads: (B, T)."""
    return probs[:, :, 0, :].float().mean(1)


def unmerge(x: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, T, C) back to the original positions (B, T0, C) via ``where`` (B, T0), and (B, T0) bool: which
    original positions are still covered (False: dropped by a pruning method; their rows are zeros)."""
    covered = where >= 0
    out = _gather_rows(x, where.clamp_min(0))
    return out * covered[..., None].to(out.dtype), covered
