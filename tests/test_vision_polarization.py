"""Learner ``polarization`` (Zhuang et al. 2020): the polarizer's value and gradient by hand, the threshold rules,
exact removal of switched-off channels on the dependency graph (coupled channels by agreement), a train-prune run
that shrinks the model and loads back, and option mistakes as one sentence with exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.vision.channels import prune_channels
from prunekit.vision.learn.polarization import polarizer, select, valley
from prunekit.vision.models import SmallCNN, SmallResNet
from prunekit.vision.train import load_data, load_run, make_config, save_run, train_prune

torch.set_num_threads(1)


def test_polarizer_value_and_gradient_by_hand():
    a = torch.tensor([0.1, 0.2], requires_grad=True)
    b = torch.tensor([0.9], requires_grad=True)
    # global: g = (0.1, 0.2, 0.9), mean 0.4: 1.2 * 1.2 - (0.3 + 0.2 + 0.5) = 0.44
    r = polarizer([a, b], 1.2, "global")
    torch.testing.assert_close(r, torch.tensor(0.44))
    r.backward()
    # d/dg_i = t sign(g_i) - sign(g_i - m) + (1/n) sum_j sign(g_j - m); signs (-1, -1, +1) sum to -1
    torch.testing.assert_close(a.grad, torch.tensor([1.2 + 1 - 1 / 3, 1.2 + 1 - 1 / 3]))
    torch.testing.assert_close(b.grad, torch.tensor([1.2 - 1 - 1 / 3]))
    a.grad = b.grad = None
    # per layer: (1.2 * 0.3 - 0.1) + (1.2 * 0.9 - 0) = 1.34; each layer's own mean
    r = polarizer([a, b], 1.2, "layer")
    torch.testing.assert_close(r, torch.tensor(1.34))
    r.backward()
    torch.testing.assert_close(a.grad, torch.tensor([2.2, 0.2]))
    torch.testing.assert_close(b.grad, torch.tensor([1.2]))


def test_polarizer_splits_the_scales():
    """Gradient descent on the polarizer alone with the paper's clamp: the scales below the mean reach exactly 0
    while the others stay well above (L1 would move all of them down by the same amount)."""
    g0 = torch.tensor([0.2, 0.3, 0.35, 0.6, 0.7, 0.8])
    g = g0.clone().requires_grad_(True)
    opt = torch.optim.SGD([g], lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        polarizer([g], 1.2).backward()
        opt.step()
        with torch.no_grad():
            g.clamp_(0, 1)
    assert torch.equal(g[:3].detach(), torch.zeros(3))
    assert bool((g[3:] > 0.4).all())


def test_valley_and_the_threshold_rules():
    g = torch.tensor([0.0, 0.0, 0.003, 0.0, 0.5, 0.52, 0.55, 0.6])
    assert valley(g, 100, 1.0) == pytest.approx(0.01)  # the end of the cluster at zero
    rm, thr = select({"a": g}, "valley")
    assert rm == {"a": [0, 1, 2, 3]} and thr["a"] == pytest.approx(0.01)
    rm, _ = select({"a": g}, 0.0)  # a number: scales at or below it
    assert rm == {"a": [0, 1, 3]}
    two = {"a": g, "b": torch.tensor([0.9, 0.001, 0.4, 0.45])}
    rm, thr = select(two, "sparsity", sparsity=0.25)  # 3 of 12 channels, the lowest scales over both layers
    assert rm == {"a": [0, 1, 3], "b": []}
    rm, _ = select({"a": torch.zeros(4)}, 0.0)  # every scale is zero: the layer still keeps one channel
    assert len(rm["a"]) == 3
    # a cluster at zero that thins out over six bins: the valley is where it ends, unless capped
    wide = torch.tensor([0.005] * 6 + [0.015] * 5 + [0.025] * 4 + [0.035] * 3 + [0.045] * 2 + [0.055] + [0.5] * 5)
    assert valley(wide, 100, 1.0) == pytest.approx(0.06)
    rm, thr = select({"a": wide}, "valley", valley_max=0.02)
    assert thr["a"] == pytest.approx(0.02) and rm["a"] == list(range(11))


def _positive_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.1)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model.eval()


def test_removing_switched_off_channels_keeps_the_outputs_identical():
    torch.manual_seed(0)
    model = _positive_norms(SmallCNN(10, 8))
    off = {"features.1": [1, 4], "features.8": [0, 2, 5, 7], "features.11": [3, 15]}  # last: feeds the flatten
    with torch.no_grad():
        for name, idx in off.items():
            bn = dict(model.named_modules())[name]
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    gammas = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    remove, _ = select(gammas, 0.0)
    assert {n: v for n, v in remove.items() if v} == off
    rep = prune_channels(model, x, remove=remove)
    assert rep["criterion"] == "explicit" and rep["params_after"] < rep["params_before"]
    f = model.features
    assert (f[0].out_channels, f[3].out_channels, f[7].out_channels, f[10].out_channels) == (6, 8, 12, 14)
    assert model.classifier[1].in_features == 14 * 49
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_coupled_channels_go_only_when_every_listed_partner_agrees():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    # the stem's BatchNorm and the first block's bn2 meet in a residual add: one group of channels
    net = _positive_norms(SmallResNet(10, 8))
    prune_channels(net, x, remove={"stem.1": [1, 2], "layers.0.bn2": [2, 3]})
    assert net.stem[0].out_channels == 7 and net.layers[0].conv2.out_channels == 7
    net = _positive_norms(SmallResNet(10, 8))
    prune_channels(net, x, remove={"stem.1": [1, 2]})  # a partner that is not listed does not object
    assert net.stem[0].out_channels == 6 and net.layers[0].bn2.num_features == 6
    with pytest.raises(PruneError, match="every output channel"):
        prune_channels(SmallCNN(10, 4), x, remove={"features.1": [0, 1, 2, 3]})
    with pytest.raises(PruneError, match="Channel 9 of 'features.1' does not exist"):
        prune_channels(SmallCNN(10, 4), x, remove={"features.1": [9]})
    with pytest.raises(PruneError, match="output channels of 'classifier.3'"):
        prune_channels(SmallCNN(10, 4), x, remove={"classifier.3": [0]})


def test_learner_polarizes_removes_and_the_run_loads_back(tmp_path):
    data = load_data("synthetic", 256, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=2, finetune_epochs=1, batch_size=32,
                      learn="polarization", options={"lam": 0.3, "t": 1.4})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    L = info["learn"]
    assert masks is None and L["gamma_histogram"]["zero"] > 0  # the polarizer drove scales to exactly 0
    assert L["channels_after"] < L["channels_before"] and L["macs_after"] < L["macs_before"]
    assert L["params_after"] == info["channels"]["params_after"] == info["metrics"]["params"]
    kept = {n: v["kept"] for n, v in L["layers"].items()}
    assert kept == {n: m.num_features for n, m in model.named_modules() if n in kept}
    assert info["journey"]["steps"] == 3 * 8  # both phases counted
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, _, manifest = load_run(tmp_path / "run")
    assert manifest["learn"]["channels_after"] == L["channels_after"]
    x = data["x_test"][:8]
    torch.testing.assert_close(back(x), model.eval()(x))


def test_cli_shrinks_the_model_and_mistakes_exit_2(tmp_path):
    from tests.conftest import error_line, invoke

    args = ["train-prune", "cnn", "--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "1",
            "--train-subset", "128", "--test-subset", "32", "--batch-size", "64", "--learn", "polarization",
            "--quiet"]
    rc, out, err = invoke(*args, "--option", "lam=1e-2", "--option", "threshold=sparsity", "--sparsity", "0.5",
                          "--out", tmp_path / "r")
    assert rc == 0, err
    assert "test accuracy before polarization's removal" in out and "dense test accuracy" not in out
    manifest = json.loads((tmp_path / "r" / "prunekit.json").read_text())
    kept = manifest["learn"]["channels_after"]  # half of 192, plus one for any layer that would lose all
    assert 96 <= kept <= 100 and manifest["shapes"]["features.0.weight"][0] < 32
    model, _, _ = load_run(tmp_path / "r")
    assert sum(p.numel() for p in model.parameters()) == manifest["learn"]["params_after"] < 468010
    for bad, word in [("lam=-1", "lam must be positive"), ("threshold=middle", "'valley', 'sparsity'"),
                      ("scope=everywhere", "scope"), ("threshold=1.5", "threshold number")]:
        rc, _, err = invoke(*args, "--option", bad, "--out", tmp_path / "bad")
        assert rc == 2 and word in error_line(err) and not (tmp_path / "bad").exists(), err
    rc, _, err = invoke(*[a if a != "cnn" else "vit" for a in args], "--out", tmp_path / "bad")
    assert rc == 2 and "needs BatchNorm" in error_line(err) and not (tmp_path / "bad").exists()
