"""The sequential calibration engine, shared by every data-driven method.

1. Capture the inputs of the first decoder block once (the model runs up to it and stops).
2. Block by block: run the block on the captured inputs with hooks on its target layers; layers that read
   the same input tensor (q/k/v, gate/up) form one group and their statistic is collected once; hand each
   group to the method; then run the pruned block again so the next block sees pruned outputs.

Peak memory: the non-block modules, one block on the device, and the calibration activations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.stats import STATS


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Per calibration chunk: the hidden states and the other arguments the block was called with."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device) -> BlockInputs:
    captured = BlockInputs()

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.hidden.append(hidden)
        captured.args.append(rest)
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in input_ids.split(batch_size):
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _call_block(block: nn.Module, inputs: BlockInputs, i: int) -> torch.Tensor:
    out = block(inputs.hidden[i], *inputs.args[i], **inputs.kwargs[i])
    return out[0] if isinstance(out, (tuple, list)) else out


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` (embeddings, final norm, head)."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in inside:
            t.data = t.data.to(device)


GroupFn = Callable[[int, list[tuple[str, nn.Module]], "torch.Tensor | None"], None]


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    targets: list[list[tuple[str, nn.Module]]],
    input_ids: torch.Tensor,
    statistic: str,
    on_group: GroupFn,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "pruning",
    propagate: bool = True,
) -> dict[str, float]:
    """Run the engine; ``on_group(block_index, [(name, module), ...], statistic_tensor)`` prunes one group.

    ``propagate=False`` is the one-pass mode: every block sees the dense model's activations (one forward
    pass per block instead of two), and ``on_group`` may also just record statistics.

    Returns wall seconds spent in forward passes (``forward_s``) and in ``on_group`` (``solve_s``).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    was_training = model.training
    model.eval()
    if device.type != "cpu":
        _move_outside_blocks(model, blocks, device)

    times = {"forward_s": 0.0, "solve_s": 0.0}
    t0 = time.perf_counter()
    inputs = capture_inputs(model, blocks, input_ids, batch_size, device)
    times["forward_s"] += time.perf_counter() - t0
    stat_cls = STATS[statistic]

    bar = tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress, leave=False)
    for bi in bar:
        block = blocks[bi].to(device)
        group_of: dict[str, int] = {}
        members: dict[int, list[tuple[str, nn.Module]]] = {}
        collectors: dict[int, object] = {}
        live: dict[int, tuple[torch.Tensor, int]] = {}

        seen_in_chunk: set[str] = set()
        n_targets = len(targets[bi])

        def make_hook(name: str, module: nn.Module):
            def hook(_mod, inp):
                x = inp[0]
                gid = group_of.get(name)
                if gid is None:
                    seen = live.get(id(x))
                    if seen is not None and seen[0] is x:
                        gid = seen[1]
                    else:
                        gid = len(members)
                        live[id(x)] = (x, gid)
                        members[gid] = []
                        collectors[gid] = stat_cls(x.shape[-1], device=x.device)
                    group_of[name] = gid
                    members[gid].append((name, module))
                if members[gid][0][0] == name:
                    collectors[gid].add(x.detach())
                seen_in_chunk.add(name)
                if propagate and len(seen_in_chunk) == n_targets:
                    # every target has its input: the rest of this pass (the last layer itself included)
                    # computes outputs nobody reads, so stop here
                    raise _StopForward

            return hook

        handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in targets[bi]]
        t0 = time.perf_counter()
        try:
            dense_out = []
            for i in range(len(inputs.hidden)):
                try:
                    out = _call_block(block, inputs, i)
                    if not propagate:
                        dense_out.append(out)
                except _StopForward:
                    pass
                live.clear()
                seen_in_chunk.clear()
        finally:
            for h in handles:
                h.remove()
        times["forward_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        for gid, group in members.items():
            on_group(bi, group, collectors[gid].value)
        del collectors
        times["solve_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        if propagate:
            for i in range(len(inputs.hidden)):
                inputs.hidden[i] = _call_block(block, inputs, i)
        else:
            inputs.hidden = dense_out
        times["forward_s"] += time.perf_counter() - t0
        if device.type != "cpu":
            blocks[bi].to("cpu")
        bar.set_postfix(forward=f"{times['forward_s']:.1f}s", solve=f"{times['solve_s']:.1f}s")
    bar.close()
    if device.type != "cpu":
        _move_outside_blocks(model, blocks, torch.device("cpu"))
    model.train(was_training)
    return times
