"""The sequential calibration engine, shared by every data-driven method.

1. Capture, once, the inputs of the first decoder block and the other arguments the model's own forward gives
   every block (masks, rotary embeddings per layer type): the blocks are replaced by recorders, so this costs
   about one embedding pass.
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

from prunekit.checks import check_finite_tensor
from prunekit.errors import PruneError
from prunekit.stats import STATS
from prunekit.core.progress import bar as progress_bar


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """What the blocks are called with, per calibration chunk.

    ``hidden[c]``: the hidden states entering the current block for chunk ``c`` (the engine replaces them block
    by block). ``args[b][c]`` / ``kwargs[b][c]``: every other argument the model's own forward passes block ``b``
    for chunk ``c`` (attention masks, rotary embeddings, position ids, ...). Blocks of different types (sliding
    vs global attention, their own rotary bases) get their own; tensors the model shares between blocks are the
    same objects here, so they are stored once.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[list[tuple]] = field(default_factory=list)
    kwargs: list[list[dict]] = field(default_factory=list)


class _Recorder(nn.Module):
    """Stands in for a block while the arguments are captured: records its call, returns its input unchanged.

    Attribute reads the model's forward makes on the block (``attention_type``, ``layer_idx``, ...) go to the
    real block.
    """

    def __init__(self, block: nn.Module, fn: Callable):
        super().__init__()
        object.__setattr__(self, "_real", block)
        object.__setattr__(self, "_fn", fn)

    def forward(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    kwargs = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _passthrough(out) -> Callable[[torch.Tensor], object]:
    """A function that returns its input shaped like a block's output ``out`` (a tensor, or a tuple led by it)."""
    if isinstance(out, torch.Tensor):
        return lambda h: h
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        rest, kind = tuple(out[1:]), type(out)
        return lambda h: kind((h, *rest))
    raise PruneError(f"A decoder block returned {type(out).__name__}; prunekit needs a tensor or a tuple led by one.")


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device,
                   stream=None) -> BlockInputs:
    """Run the model's own forward on every chunk with each block replaced by a recorder.

    Block 0's hidden input is kept, and for every block the other arguments exactly as the model passes them.
    The blocks themselves do not run (the forward stops after the last block's call), except once per block
    class on the first chunk, directly through ``forward`` (its own hooks do not fire), to learn what a block
    returns so the recorder can hand the model the same shape.

    ``stream`` (a :class:`prunekit.stream.BlockStream`): the blocks' weights live on disk; that one block is
    loaded for its shape probe and freed again, and the hidden inputs go to ``stream.hidden_store()``.
    """
    device = torch.device(device)
    n = len(blocks)
    captured = BlockInputs(args=[[] for _ in range(n)], kwargs=[[] for _ in range(n)])
    if stream is not None:
        captured.hidden = stream.hidden_store()
    passthrough: dict[type, Callable] = {}

    def make(bi: int, block: nn.Module) -> Callable:
        def record(*args, **kwargs):
            hidden, rest, kw = _split_call(args, kwargs)
            if bi == 0:
                captured.hidden.append(hidden)
            captured.args[bi].append(rest)
            captured.kwargs[bi].append(kw)
            if bi == n - 1:
                raise _StopForward  # nothing after the last block is needed
            fn = passthrough.get(type(block))
            if fn is None:
                if stream is not None:
                    stream.load(bi)
                if device.type != "cpu":
                    block.to(device)
                fn = passthrough[type(block)] = _passthrough(block.forward(hidden, *rest, **kw))
                if device.type != "cpu":
                    block.to("cpu")
                if stream is not None:
                    stream.free(bi)
            return fn(hidden)

        return record

    originals = list(blocks)
    if stream is not None:
        stream.load_outside()
    try:
        for bi, block in enumerate(originals):
            blocks[bi] = _Recorder(block, make(bi, block))
        for chunk in input_ids.split(batch_size):
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for bi, block in enumerate(originals):
            blocks[bi] = block
        if stream is not None:
            stream.free_outside()
    chunks = len(captured.hidden)
    missing = [bi for bi in range(n) if len(captured.kwargs[bi]) != chunks]
    if missing:
        raise PruneError(
            f"The model's forward did not call decoder block(s) {missing[:5]} once per batch; prunekit cannot "
            "calibrate a model that skips or repeats blocks."
        )
    return captured


def _call_block(block: nn.Module, inputs: BlockInputs, bi: int, i: int) -> torch.Tensor:
    out = block(inputs.hidden[i], *inputs.args[bi][i], **inputs.kwargs[bi][i])
    return out[0] if isinstance(out, (tuple, list)) else out


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` (embeddings, final norm, head)."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in inside:
            t.data = t.data.to(device)


def activation_bytes_per_token(model: nn.Module) -> int:
    """A generous estimate of the bytes one token's activations take inside one block's forward (fp32): the
    hidden states a few times over, the MLP's intermediate three times, one row of attention scores per head."""
    c = getattr(model, "config", None)
    hidden = int(getattr(c, "hidden_size", 0) or 0)
    inter = int(getattr(c, "intermediate_size", 0) or getattr(c, "ffn_dim", 0) or 4 * hidden)
    heads = int(getattr(c, "num_attention_heads", 0) or 1)
    return 4 * (8 * hidden + 3 * inter + heads * 64)


def available_bytes(device) -> int:
    """Free memory of ``device`` (CPU: MemAvailable of /proc/meminfo, else 4 GiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def resolve_batch_size(model: nn.Module, batches: torch.Tensor | None, want: int | str, device="cpu") -> int:
    """``want`` as a number of sequences per forward pass: ``'all'`` is every calibration sequence at once when
    their activations inside one block fit in a quarter of the free memory, else the largest count that does."""
    if want != "all":
        return int(want)
    if batches is None:
        return 8
    n, seqlen = int(batches.shape[0]), int(batches.shape[1])
    per_seq = activation_bytes_per_token(model) * seqlen + 4 * seqlen * seqlen * int(
        getattr(getattr(model, "config", None), "num_attention_heads", 1) or 1)
    fits = max(1, available_bytes(device) // 4 // max(1, per_seq))
    return max(1, min(n, int(fits)))


class ComputePrecision:
    """``with ComputePrecision(device, "bf16"):`` the forwards inside run in bfloat16 autocast, and on a CPU the fp32
    matrix products left (the statistics' sums X^T X) use oneDNN's implicit bf16 (fp32 inputs, outputs and
    accumulation; ``torch.backends.mkldnn.matmul.fp32_precision``; AMX where the CPU has it). ``"fp32"``: nothing
    changes. Reusable; the settings are put back on leaving."""

    def __init__(self, device, precision: str):
        self.device, self.precision = torch.device(device), precision
        self._saved = None

    def __enter__(self):
        if self.precision != "bf16":
            return self
        auto = torch.autocast(self.device.type, dtype=torch.bfloat16)
        auto.__enter__()
        matmul = getattr(torch.backends.mkldnn, "matmul", None)
        old = None
        if self.device.type == "cpu" and matmul is not None and hasattr(matmul, "fp32_precision"):
            old = matmul.fp32_precision
            matmul.fp32_precision = "bf16"
        self._saved = (auto, old)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            auto, old = self._saved
            self._saved = None
            if old is not None:
                torch.backends.mkldnn.matmul.fp32_precision = old
            auto.__exit__(*exc)
        return False


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
    stream=None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Run the engine; ``on_group(block_index, [(name, module), ...], statistic_tensor)`` prunes one group.

    ``propagate=False`` is the one-pass mode: every block sees the dense model's activations (one forward
    pass per block instead of two), and ``on_group`` may also just record statistics.

    ``stream`` (a :class:`prunekit.stream.BlockStream`): the model is a skeleton whose blocks live on disk;
    each block is loaded before its turn and handed to ``stream.done`` after it (which writes and frees it);
    ``stream.resume`` may restore the activations of a finished block and say where to continue.

    ``precision="bf16"``: the block forwards and the statistics' matrix products run in bfloat16 with fp32
    accumulation (:class:`ComputePrecision`); the method's solve (``on_group``) always runs in fp32.

    Returns wall seconds spent in forward passes (``forward_s``), in collecting the statistics inside them
    (``stats_s``, not part of ``forward_s``) and in ``on_group`` (``solve_s``).
    """

    device = torch.device(device)
    was_training = model.training
    model.eval()
    if device.type != "cpu" and stream is None:  # streamed: the stream puts what the capture needs on the device
        _move_outside_blocks(model, blocks, device)

    times = {"forward_s": 0.0, "stats_s": 0.0, "solve_s": 0.0}
    autocast = ComputePrecision(device, precision)
    clock = time.perf_counter
    t0 = time.perf_counter()
    inputs = capture_inputs(model, blocks, input_ids, batch_size, device, stream=stream)
    times["forward_s"] += time.perf_counter() - t0
    stat_cls = STATS[statistic]
    first = 0 if stream is None else stream.resume(inputs)

    bar = progress_bar(range(first, len(blocks)), desc=desc, unit="block", enabled=progress)
    for bi in bar:
        if stream is not None:
            t0 = time.perf_counter()
            stream.load(bi)
            times["io_s"] = times.get("io_s", 0.0) + time.perf_counter() - t0
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
                    t = clock()
                    collectors[gid].add(x.detach())
                    times["stats_s"] += clock() - t
                seen_in_chunk.add(name)
                if propagate and len(seen_in_chunk) == n_targets:
                    # every target has its input: the rest of this pass (the last layer itself included)
                    # computes outputs nobody reads, so stop here
                    raise _StopForward

            return hook

        handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in targets[bi]]
        t0 = time.perf_counter()
        stats0 = times["stats_s"]
        try:
            dense_out = [] if stream is None or propagate else stream.hidden_store()
            for i in range(len(inputs.hidden)):
                try:
                    with autocast:
                        out = _call_block(block, inputs, bi, i)
                    if not propagate:
                        dense_out.append(out.to(inputs.hidden[i].dtype))
                except _StopForward:
                    pass
                live.clear()
                seen_in_chunk.clear()
        finally:
            for h in handles:
                h.remove()
        times["forward_s"] += time.perf_counter() - t0 - (times["stats_s"] - stats0)

        t0 = time.perf_counter()
        for gid, group in members.items():
            value = collectors.pop(gid).value  # each group's statistic is freed once its group is pruned
            # a sum of squares is finite iff every activation is: for a Hessian X^T X its diagonal says it all
            # (|H_ij| <= sqrt(H_ii H_jj)), a vector's worth of checking instead of a matrix's
            square = value.dim() == 2 and value.shape[0] == value.shape[1] and statistic == "hessian"
            check_finite_tensor(value.diagonal() if square else value, f"The calibration activations entering {group[0][0]}")
            on_group(bi, group, value)
            del value
        del collectors
        times["solve_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        if propagate:
            for i in range(len(inputs.hidden)):
                with autocast:
                    inputs.hidden[i] = _call_block(block, inputs, bi, i).to(inputs.hidden[i].dtype)
        else:
            inputs.hidden = dense_out
        times["forward_s"] += time.perf_counter() - t0
        if device.type != "cpu":
            blocks[bi].to("cpu")
        if stream is not None:
            t0 = time.perf_counter()
            stream.done(bi, inputs.hidden)
            times["io_s"] += time.perf_counter() - t0
        bar.set_postfix(forward=f"{times['forward_s']:.1f}s", solve=f"{times['solve_s']:.1f}s")
    bar.close()
    if device.type != "cpu" and stream is None:
        _move_outside_blocks(model, blocks, torch.device("cpu"))
    model.train(was_training)
    return times
