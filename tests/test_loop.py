"""The one training loop (core/loop.py) and the schedules as objects for any loop (vision/schedules.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.loop import LR_SCHEDULES, WeightAverage, kd_loss, make_optimizer, make_schedule, train_loop
from prunekit.core.masks import Masks
from prunekit.errors import PruneError
from prunekit.vision.schedules import Gradual, Lottery, OneShot, cubic_sparsity, pruner


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _ce(x, y):
    def loss_fn(model, idx):
        out = model(x[idx])
        return F.cross_entropy(out, y[idx]), out
    return loss_fn


def _epochs(n, batch, epochs):
    return [list(torch.arange(n).split(batch)) for _ in range(epochs)]


def test_masks_hold_during_and_after_the_loop_and_training_happens():
    model, (x, y) = _net(), _data()
    masks = Masks.from_scores({"0.weight": torch.rand(16, 8, generator=torch.Generator().manual_seed(2))}, {"0.weight": 40})
    before = model[2].weight.detach().clone()
    opt = make_optimizer(model.parameters(), "sgd", 0.1, weight_decay=1e-3)
    seen = []
    res = train_loop(model, opt, _epochs(64, 16, 3), _ce(x, y), masks=masks, progress=False,
                     after_step=lambda step, epoch, b, out, loss: seen.append((step, epoch)))
    assert res.step == 12 and len(res.losses) == 12 and seen[0] == (1, 0) and seen[-1] == (12, 2)
    assert int((model[0].weight != 0).sum()) == 40 and bool((model[0].weight[~masks["0.weight"]] == 0).all())
    assert not torch.equal(model[2].weight, before)  # it trained
    assert masks._handles == []  # detached: training on does not enforce them any more
    assert res.losses[-1] < res.losses[0]


def test_on_step_replaces_the_masks_and_the_result_says_which():
    model, (x, y) = _net(), _data()
    opt = make_optimizer(model.parameters(), "adamw", 1e-2)
    prune = pruner("magnitude", "uniform")
    sched = Gradual(prune, final=0.75, start=2, end=10, every=2)
    res = train_loop(model, opt, _epochs(64, 8, 2), _ce(x, y), on_step=lambda s: sched.on_step(s, model),
                     progress=False)
    assert res.masks is sched.masks and res.masks.sparsity() == pytest.approx(0.75, abs=0.01)
    assert [e["step"] for e in sched.log] == [2, 4, 6, 8, 10]
    assert [round(e["target"], 6) for e in sched.log] == [round(cubic_sparsity(s, 2, 10, 0.75, 0.0, 2), 6) if s < 10
                                                          else 0.75 for s in (2, 4, 6, 8, 10)]
    w = dict(model.named_parameters())
    for k, m in res.masks.items():
        assert bool((w[k][~m] == 0).all())


def test_interrupt_leaves_masks_applied_and_detached():
    model, (x, y) = _net(), _data()
    masks = Masks.from_scores({"0.weight": torch.rand(16, 8)}, {"0.weight": 10})
    opt = make_optimizer(model.parameters(), "sgd", 0.1)

    def stop(step, *a):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, opt, _epochs(64, 8, 1), _ce(x, y), masks=masks, after_step=stop, progress=False)
    assert masks._handles == [] and int((model[0].weight != 0).sum()) <= 10


def test_ema_leaves_the_weight_average_in_the_model_with_masks_held():
    (x, y) = _data()
    masks = Masks.from_scores({"0.weight": torch.rand(16, 8, generator=torch.Generator().manual_seed(2))}, {"0.weight": 40})
    # the same run twice: once recording every step's weights, once with ema=0.9
    model = _net()
    start = [p.detach().clone() for p in model.parameters()]
    trail = []
    opt = make_optimizer(model.parameters(), "sgd", 0.1)
    train_loop(model, opt, _epochs(64, 16, 3), _ce(x, y), masks=masks, progress=False,
               after_step=lambda *a: trail.append([p.detach().clone() for p in model.parameters()]))
    last = [p.detach().clone() for p in model.parameters()]
    expect = [s.clone() for s in start]
    for step, ws in enumerate(trail, 1):
        d = min(0.9, (1 + step) / (10 + step))
        expect = [e * d + w * (1 - d) for e, w in zip(expect, ws)]
    model2 = _net()
    masks2 = Masks.from_scores({"0.weight": torch.rand(16, 8, generator=torch.Generator().manual_seed(2))}, {"0.weight": 40})
    res = train_loop(model2, make_optimizer(model2.parameters(), "sgd", 0.1), _epochs(64, 16, 3), _ce(x, y),
                     masks=masks2, progress=False, ema=0.9)
    got = list(model2.parameters())
    assert res.step == 12
    for g, e, l in zip(got, expect, last):
        assert not torch.allclose(e, l)  # the average is not the last weights
    expect[0] = expect[0] * masks2["0.weight"]  # the removed weights stay removed
    for g, e in zip(got, expect):
        assert torch.allclose(g, e, atol=1e-6)
    assert int((model2[0].weight != 0).sum()) == 40


def test_ema_is_not_copied_when_the_loop_is_interrupted_and_bad_decay_is_a_sentence():
    model, (x, y) = _net(), _data()
    opt = make_optimizer(model.parameters(), "sgd", 0.1)
    seen = []

    def stop(step, *a):
        seen.append(model[2].weight.detach().clone())
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, opt, _epochs(64, 8, 1), _ce(x, y), after_step=stop, progress=False, ema=0.99)
    assert torch.equal(model[2].weight, seen[-1])  # the live weights, not an average of them
    with pytest.raises(PruneError, match=r"decay must be in \(0, 1\)"):
        WeightAverage(model, 1.0)


def test_a_nonfinite_loss_is_one_sentence():
    model, (x, y) = _net(), _data()
    opt = make_optimizer(model.parameters(), "sgd", 1e6)
    x = x * 1e6
    with pytest.raises(PruneError, match=r"Training diverged \(loss .* at step \d+\); lower the learning rate"):
        train_loop(model, opt, _epochs(64, 8, 5), _ce(x, y), progress=False)
    with pytest.raises(PruneError, match="custom 7"):
        train_loop(_net(), make_optimizer(_net().parameters(), "sgd", 0.1), [[torch.arange(2)]],
                   lambda m, b: (torch.tensor(float("nan"), requires_grad=True), None), progress=False,
                   diverged=lambda step, v: f"custom {step + 6}")


def test_kd_loss_is_hinton_on_flattened_rows():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    T = 3.0
    p = F.softmax(t / T, -1)
    want = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert float(kd_loss(s, t, T)) == pytest.approx(float(want), rel=1e-5)
    assert float(kd_loss(s, s, T)) == pytest.approx(0.0, abs=1e-6)


def test_lr_schedules():
    assert set(LR_SCHEDULES) == {"constant", "cosine", "warmup-cosine", "onecycle"}

    def lrs(name, **kw):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_schedule(opt, name, 10, **kw)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    assert lrs("constant") == [1.0] * 10
    assert lrs("cosine") == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])
    w = lrs("warmup-cosine", warmup=2, min_factor=0.1)
    assert w[:2] == pytest.approx([0.5, 1.0]) and w[2] == pytest.approx(1.0) and w[-1] > 0.1 and w[-1] < w[3]
    one = lrs("onecycle")
    assert max(one) == pytest.approx(1.0, rel=0.05) and one[0] < 0.1
    with pytest.raises(PruneError, match="choose one of"):
        lrs("linear")


def test_schedules_in_a_users_own_loop():
    """OneShot at init and Lottery rounds in a plain PyTorch loop, no prunekit loop."""
    model, (x, y) = _net(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    once = OneShot(pruner("magnitude", "global"), 0.5, at=0)
    masks = None
    for step in range(6):
        new = once.on_step(step, model)
        if new is not None:
            masks = new.attach(model, opt)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    masks.detach()
    assert once.log == [{"step": 0, "target": 0.5, "sparsity": pytest.approx(0.5, abs=0.01)}]
    assert sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in masks) >= masks.numel() - masks.kept()

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lot = Lottery(pruner("magnitude", "global"), final=0.75, rounds=2, round_steps=4, rewind_step=1)
    events = []
    for step in range(10):
        new = lot.on_step(step, model)
        if new is not None:
            events.append(step)
            assert torch.equal(model[2].bias, lot.rewinder.state["2.bias"])  # survivors rewound to step 1
            if masks is not None:
                masks.detach()
            masks = new.attach(model, opt)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert events == [4, 8] and [round(e["target"], 4) for e in lot.log] == [0.5, 0.75]
    with pytest.raises(PruneError, match="either a final sparsity"):
        Lottery(pruner(), final=0.5, targets=[0.5])


def test_gradient_pass_sums_and_puts_everything_back():
    from prunekit.core.gradients import gradient_pass

    model, (x, y) = _net(), _data()
    model[2].weight.requires_grad_(False)  # a flag the pass must restore
    model.eval()
    acc = torch.zeros_like(model[0].weight)

    def add(i, p, g):
        acc.add_(g)
    gradient_pass(model, [model[0].weight], list(torch.arange(64).split(16)),
                  lambda m, idx: F.cross_entropy(m(x[idx]), y[idx], reduction="sum"), add, train=True)
    whole = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), model[0].weight)[0]
    assert torch.allclose(acc, whole, atol=1e-5)
    assert not model.training and model[2].weight.requires_grad is False and model[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())

    def boom(m, idx):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        gradient_pass(model, [model[0].weight], [0], boom, add)
    assert model[2].weight.requires_grad is False and model[0].weight.requires_grad and not model.training


def test_kd_loss_gradient_is_autograds_and_exactly_zero_at_the_teacher():
    s = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 11, dtype=torch.float64)
    T = 1.7
    ref = F.kl_div(F.log_softmax(s / T, -1).reshape(-1, 11), F.log_softmax(t / T, -1).reshape(-1, 11), log_target=True,
                   reduction="batchmean") * T * T
    (g_ref,) = torch.autograd.grad(ref, s)
    loss = kd_loss(s, t, T)
    (g,) = torch.autograd.grad(loss, s)
    assert float(loss) == pytest.approx(float(ref), rel=1e-12) and torch.allclose(g, g_ref, atol=1e-12)
    x = torch.randn(4, 7, 33, requires_grad=True)
    (g0,) = torch.autograd.grad(kd_loss(x, x.detach().clone(), 2.0), x)
    assert float(kd_loss(x, x.detach().clone(), 2.0)) == 0.0 and not g0.any()
