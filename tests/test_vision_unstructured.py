"""Unstructured vision pruning: allocation, criteria, schedules, masks during training, rewinding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.vision import criteria as C
from prunekit.vision import schedules as S
from prunekit.core.allocate import allocate_masks, erk_densities, lamp_scores
from prunekit.core.masks import Masks, prunable
from prunekit.vision.models import SmallCNN
from prunekit.vision.train import load_data, make_config, train_epochs

torch.set_num_threads(1)


def allocate(scores, sparsity, allocation="global", min_density=None):
    """The vision spelling: global-min = global with the per-layer floor."""
    return allocate_masks(scores, sparsity, "global" if allocation == "global-min" else allocation,
                          min_density=min_density or 0.0)


def layered_scores(seed=0):
    """Layers of very different scale: plain global ranking empties the small-scale one at high sparsity."""
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.rand(64, 32, generator=g),
            "b.weight": torch.rand(16, 8, 3, 3, generator=g) * 0.01,  # tiny magnitudes
            "c.weight": torch.rand(10, 64, generator=g) * 0.5}


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.98])
def test_global_min_exact_target_and_minimum(sparsity):
    scores = layered_scores()
    n = sum(s.numel() for s in scores.values())
    md = 0.015
    masks = allocate(scores, sparsity, "global-min", min_density=md)
    assert masks.kept() == round((1 - sparsity) * n)
    for k, m in masks.items():
        assert int(m.sum()) >= math.ceil(md * m.numel() - 1e-9), k
        # within a layer the kept weights are the best-scored ones
        kept, dropped = scores[k][m], scores[k][~m]
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()
    # beyond each layer's reserve the choice is global: no dropped weight beats a kept non-reserved weight
    extra_min, dropped_max = float("inf"), -float("inf")
    for k, m in masks.items():
        r = math.ceil(md * m.numel() - 1e-9)
        vals = scores[k].flatten().sort(descending=True).values
        kept_n = int(m.sum())
        if kept_n > r:
            extra_min = min(extra_min, float(vals[kept_n - 1]))
        if kept_n < m.numel():
            dropped_max = max(dropped_max, float(vals[kept_n]))
    assert extra_min >= dropped_max or extra_min == float("inf")


def test_plain_global_collapses_where_global_min_does_not():
    scores = layered_scores()
    plain = allocate(scores, 0.9, "global")
    assert plain.layer_density()["b.weight"] == 0.0  # the whole small-scale layer is gone
    assert plain.kept() == round(0.1 * sum(s.numel() for s in scores.values()))
    fixed = allocate(scores, 0.9, "global-min", min_density=0.05)
    assert fixed.layer_density()["b.weight"] >= 0.05


def test_global_min_rejects_minimum_above_target_density():
    with pytest.raises(PruneError, match="above the target density"):
        allocate(layered_scores(), 0.9, "global-min", min_density=0.2)
    with pytest.raises(PruneError, match=r"\[0, 1\)"):
        allocate(layered_scores(), 1.0, "global")


@pytest.mark.parametrize("alloc", ["uniform", "global", "lamp", "erk"])
def test_every_allocation_keeps_exactly_the_target(alloc):
    scores = layered_scores(1)
    n = sum(s.numel() for s in scores.values())
    for s in (0.3, 0.9, 0.99):
        assert allocate(scores, s, alloc).kept() == round((1 - s) * n)


def test_erk_ratios_match_formula():
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 3, 3), "fc": (10, 64 * 49)}
    sizes = {k: math.prod(v) for k, v in shapes.items()}
    for sparsity in (0.5, 0.9, 0.98):
        d = erk_densities(shapes, sparsity)
        raw = {k: sum(v) / math.prod(v) for k, v in shapes.items()}
        sparse = [k for k in d if d[k] < 1.0]
        eps = d[sparse[0]] / raw[sparse[0]]
        for k in sparse:  # density proportional to (sum of dims) / (product of dims), one epsilon for all
            assert d[k] == pytest.approx(eps * raw[k], rel=1e-9)
        for k in d:
            if d[k] == 1.0:  # dense layers are those the formula would push above 1
                assert eps * raw[k] >= 1.0 - 1e-9
        assert sum(d[k] * sizes[k] for k in d) == pytest.approx((1 - sparsity) * sum(sizes.values()), rel=1e-9)
    sat = erk_densities({"small": (4, 1, 3, 3), "big": (256, 256)}, 0.5)
    assert sat["small"] == 1.0 and sat["big"] < 0.5  # a small layer saturates, the big one pays for it
    # masks follow the ERK counts
    scores = {k: torch.rand(v) for k, v in shapes.items()}
    m = allocate(scores, 0.9, "erk")
    d = erk_densities(shapes, 0.9)
    for k in shapes:
        assert abs(int(m[k].sum()) - d[k] * sizes[k]) <= 1.0


def test_lamp_scores_formula():
    w = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    lamp = lamp_scores({"w": w})["w"]
    v = w.flatten() ** 2
    for i in range(4):
        expect = v[i] / v[v >= v[i]].sum()
        assert lamp.flatten()[i] == pytest.approx(float(expect))
    m = allocate({"a": torch.rand(100) * 1e-3, "b": torch.rand(100)}, 0.99, "lamp")
    assert all(int(x.sum()) >= 1 for _, x in m.items())  # every layer's largest weight survives


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 4, bias=False)
        self.l2 = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.l2(self.l1(x))


def test_synflow_scores_formula_and_data_free():
    torch.manual_seed(0)
    m = TwoLinear()
    s = C.synflow_scores(m, ["l1.weight", "l2.weight"], (5,))
    w1, w2 = m.l1.weight.detach().abs().double(), m.l2.weight.detach().abs().double()
    # R = 1^T |W2| |W1| 1 ; dR/dW1_ij = sum_k |W2|_ki ; dR/dW2_ki = sum_j |W1|_ij
    exp1 = w1 * w2.sum(0)[:, None]
    exp2 = w2 * w1.sum(1)[None, :]
    assert torch.allclose(s["l1.weight"].double(), exp1, rtol=1e-5)
    assert torch.allclose(s["l2.weight"].double(), exp2, rtol=1e-5)
    assert (m.l1.weight < 0).any()  # the original (signed) weights were not made positive in place


def test_synflow_is_iterative_and_needs_no_data(monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN(10, 4)
    calls = []
    real = S.score

    def counting(*a, **kw):
        calls.append(kw.get("masks"))
        assert kw.get("batches") is None  # data-free: no batches are ever passed
        return real(*a, **kw)

    monkeypatch.setattr(S, "score", counting)
    one = S.compute_masks(model, 0.99, "synflow", "global", input_shape=(1, 28, 28), iterations=1)
    assert len(calls) == 1
    calls.clear()
    many = S.compute_masks(model, 0.99, "synflow", "global", input_shape=(1, 28, 28), iterations=20)
    assert len(calls) == 20
    assert calls[0] is None and all(c is not None for c in calls[1:])  # later rounds score the masked network
    # the masks of the rounds grow monotonically and end at the target exactly
    dens = [1.0] + [1 - c.sparsity() for c in calls[1:]] + [1 - many.sparsity()]
    assert all(a >= b - 1e-12 for a, b in zip(dens, dens[1:]))
    assert many.kept() == round(0.01 * many.numel())
    assert not all(torch.equal(one[k], many[k]) for k in one)  # iterating changes the result
    assert min(many.layer_density().values()) > 0.0  # iterative SynFlow keeps every layer connected


def test_snip_grasp_taylor_need_data_and_do_not_touch_bn_stats():
    torch.manual_seed(0)
    model = SmallCNN(10, 4)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for crit in ("snip", "grasp", "taylor"):
        with pytest.raises(PruneError, match="needs training batches"):
            C.score(model, crit)
        s = C.score(model, crit, batches=[(x, y)])
        assert set(s) == set(prunable(model)) and all(torch.isfinite(v).all() for v in s.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # SNIP = |g * w|
    model.zero_grad()
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    w = model.features[0].weight
    expect = (w.grad * w).abs().detach().clone()
    model.load_state_dict(before)  # the training-mode forward moved the BatchNorm statistics
    assert torch.allclose(C.score(model, "snip", batches=[(x, y)])["features.0.weight"], expect, atol=1e-6)
    model.load_state_dict(before)


def test_cubic_schedule_matches_formula_every_step():
    t0, t_end, every, sf, si = 10, 110, 5, 0.9, 0.1
    for t in range(0, 130):
        got = S.cubic_sparsity(t, t0, t_end, sf, si, every)
        if t < t0:
            exp = si
        elif t >= t_end:
            exp = sf
        else:
            tq = t0 + ((t - t0) // every) * every
            exp = sf + (si - sf) * (1 - (tq - t0) / (t_end - t0)) ** 3
        assert got == pytest.approx(exp, abs=1e-12), t
    assert S.cubic_sparsity(t0, t0, t_end, sf) == 0.0
    with pytest.raises(PruneError, match="before it starts"):
        S.cubic_sparsity(5, 50, 40, 0.9)
    with pytest.raises(PruneError, match=r"\[0, 1\)"):
        S.cubic_sparsity(5, 0, 40, 1.0)


def test_lottery_sparsities_prune_a_constant_fraction():
    s = S.lottery_sparsities(0.96, 2)
    assert s == pytest.approx([0.8, 0.96])


def test_masks_enforced_during_training():
    torch.manual_seed(0)
    data = load_data("synthetic", 128, 32)
    model = SmallCNN(10, 4)
    masks = S.compute_masks(model, 0.8, "magnitude", "global")
    cfg = make_config(model="cnn", dataset="synthetic", batch_size=32, lr=0.1)
    train_epochs(model, data, 2, cfg, masks, progress=False)
    p = dict(model.named_parameters())
    for k, m in masks.items():
        assert (p[k][~m] == 0).all(), k
        assert (p[k][m] != 0).float().mean() > 0.9  # survivors did train (not all frozen at zero)
    assert masks._handles == []  # hooks removed after training


def test_rewinding_restores_early_weights_under_the_mask():
    torch.manual_seed(0)
    data = load_data("synthetic", 128, 32)
    model = SmallCNN(10, 4)
    cfg = make_config(model="cnn", dataset="synthetic", batch_size=32, lr=0.1)
    rew = S.Rewinder()

    def save(step):
        if step == 2:
            rew.save(model, step)

    train_epochs(model, data, 2, cfg, None, on_step=save, progress=False)
    early = rew.state
    masks = S.compute_masks(model, 0.7, "magnitude", "global")
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(trained[k], early[k]) for k in early)
    rew.rewind(model, masks)
    sd = model.state_dict()
    for k, v in early.items():
        if k in masks.masks:
            m = masks[k]
            assert torch.equal(sd[k][m], v[m]) and (sd[k][~m] == 0).all()
        else:
            assert torch.equal(sd[k], v), k  # biases, BatchNorm affine and running stats rewound too


def test_masks_state_roundtrip():
    m = Masks({"a": torch.rand(3, 4) > 0.5})
    back = Masks.from_state(m.state())
    assert torch.equal(back["a"], m["a"])


def test_bn_recalibration_uses_plain_averages_of_training_batches():
    from prunekit.vision.train import batches_of, recalibrate_bn

    torch.manual_seed(0)
    data = load_data("synthetic", 256, 32)
    model = SmallCNN(10, 4).eval()
    bn = model.features[1]
    bn.momentum = 0.01
    bn.running_mean.fill_(5.0)
    means = []
    h = model.features[0].register_forward_hook(lambda m, i, o: means.append(o.mean((0, 2, 3))))
    recalibrate_bn(model, data, batches=4, batch_size=64)
    h.remove()
    assert len(means) == 4
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert bn.momentum == 0.01 and not model.training  # settings restored
