"""Measured speed: prefill tokens per second of a pruned model beside its dense original.

The two models are timed alternately (dense, pruned, dense, pruned, ...) on the same random prompts, after one
warm-up each, so that a change in the machine's load hits both; each figure is the median over the pairs.
"""

from __future__ import annotations

import statistics
import time

import torch


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def _timer(model, ids: torch.Tensor):
    ids = ids.to(_device_of(model))

    def run() -> float:
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        return time.perf_counter() - t0

    return run


def paired_prefill(dense, pruned, *, batch: int = 1, seqlen: int = 256, runs: int = 5, seed: int = 0) -> dict:
    """``{"tokens_per_s", "tokens_per_s_dense", "speedup", "batch", "seqlen", "runs"}``: prefill (one forward pass
    of ``batch`` x ``seqlen`` tokens, no cache) of ``pruned`` and ``dense`` timed in ``runs`` alternating pairs;
    speed-up = the median over the pairs of t_dense / t_pruned."""
    vocab = int(getattr(pruned.config, "vocab_size", 0) or 256)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))
    was = dense.training, pruned.training
    dense.eval()
    pruned.eval()
    try:
        td, tp = _timer(dense, ids), _timer(pruned, ids)
        td(), tp()  # warm-up
        pairs = [(td(), tp()) for _ in range(runs)]
    finally:
        dense.train(was[0])
        pruned.train(was[1])
    tokens = batch * seqlen
    return {"tokens_per_s": tokens / statistics.median(p for _, p in pairs),
            "tokens_per_s_dense": tokens / statistics.median(d for d, _ in pairs),
            "speedup": statistics.median(d / p for d, p in pairs), "batch": batch, "seqlen": seqlen, "runs": runs}
