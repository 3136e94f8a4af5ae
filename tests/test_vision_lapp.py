"""Learner ``lapp`` (Zhai et al. 2023): thresholds at 0 give the dense model, the straight-through gate's gradient
by hand, FLOPs of masks by hand (equal to count_macs when dense), the final masks within the tolerance of the FLOPs
target, a train-prune run that loads back, and option mistakes as one sentence with exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.utils import parametrize

from prunekit.core.masks import prunable
from prunekit.vision.channels import count_macs
from prunekit.vision.learn.lapp import ThresholdGate, fit_to_target, flops_ratio, output_positions, target_at
from prunekit.vision.models import SmallCNN, TinyViT
from prunekit.vision.train import load_data, load_run, make_config, save_run, train_prune

torch.set_num_threads(1)

CNN_POSITIONS = {"features.0.weight": 784, "features.3.weight": 784, "features.7.weight": 196,
                 "features.10.weight": 196, "classifier.1.weight": 1, "classifier.3.weight": 1}


def test_thresholds_at_zero_give_the_dense_model():
    torch.manual_seed(0)
    model = SmallCNN(10, 8).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        dense = model(x)
    gates = []
    for name in prunable(model):
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        gates.append(ThresholdGate(0.1))
        parametrize.register_parametrization(mod, "weight", gates[-1], unsafe=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, rtol=0, atol=0)
    gates[1].threshold.data.fill_(1.0)  # a raised threshold removes weights
    with torch.no_grad():
        assert not torch.equal(model(x), dense)


def test_straight_through_gate_value_and_gradient_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])  # rms = sqrt(5.25 / 4)
    g = ThresholdGate(0.5)
    g.threshold.data.fill_(1.0)
    s = w.abs() / (5.25 / 4) ** 0.5
    out = g(w)
    torch.testing.assert_close(out, w * (s > 1.0))  # forward: the hard step
    out.sum().backward()
    sig = torch.sigmoid((s - 1.0) / 0.5)
    # d/dt sum(w * m): the surrogate's -sigmoid' / temperature times each weight
    torch.testing.assert_close(g.threshold.grad, -(w * sig * (1 - sig) / 0.5).sum())


def test_flops_by_hand_and_equal_to_count_macs_when_dense():
    model = SmallCNN(10, 32)
    x = torch.randn(2, 1, 28, 28)
    pos = output_positions(model, x, list(prunable(model)))
    assert pos == CNN_POSITIONS
    params = dict(model.named_parameters())
    dense = {n: torch.ones_like(params[n], dtype=torch.bool) for n in pos}
    assert float(flops_ratio(dense, pos)) == 1.0
    assert sum(params[n].numel() * pos[n] for n in pos) == count_macs(model, x[:1])
    half = dict(dense, **{"features.3.weight": torch.zeros(32, 32, 3, 3, dtype=torch.bool)})
    torch.testing.assert_close(float(flops_ratio(half, pos)), 1 - 9216 * 784 / count_macs(model, x[:1]))
    vit = TinyViT(10, 16)
    pos = output_positions(vit, x, list(prunable(vit)))  # 16 patches + the class token; the patch conv: 4 x 4
    assert pos["patch.weight"] == 16 and pos["blocks.layers.0.self_attn.in_proj_weight"] == 17
    assert pos["blocks.layers.0.self_attn.out_proj.weight"] == 17 and pos["head.weight"] == 1
    assert target_at(0, 100, 0.3, 0.5) == 1.0 and target_at(50, 100, 0.3, 0.5) == 0.3
    assert target_at(25, 100, 0.3, 0.5) == pytest.approx(0.3 + 0.7 / 8)


def test_fit_to_target_lands_within_the_tolerance():
    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(40, 30, generator=g) for i in range(3)}
    pos = {"l0": 100, "l1": 25, "l2": 1}
    thresholds = {"l0": 0.2, "l1": 1.5, "l2": 0.0}
    for target in (0.2, 0.5, 0.9):
        masks, shift = fit_to_target(weights, thresholds, pos, target, 0.005)
        assert abs(float(flops_ratio(masks, pos)) - target) <= 0.005 and shift != 0.0
    masks, shift = fit_to_target(weights, thresholds, pos, 0.5, 1.0)  # already within: no shift
    assert shift == 0.0


def test_learner_meets_the_flops_target_and_the_run_loads_back(tmp_path):
    data = load_data("synthetic", 256, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=2, finetune_epochs=1, batch_size=32, sparsity=0.6,
                      learn="lapp", options={"tolerance": 0.01})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    L = info["learn"]
    kept = sum(int(masks[n].sum()) * p for n, p in CNN_POSITIONS.items())
    dense = sum(masks[n].numel() * p for n, p in CNN_POSITIONS.items())
    assert abs(kept / dense - 0.4) <= 0.01 and L["flops_ratio"] == pytest.approx(kept / dense)
    assert L["flops_ratio_learned"] < 0.9  # the thresholds themselves pruned during training
    assert any(r["threshold"] > 0.3 for r in L["layers"].values())
    params = dict(model.named_parameters())
    for n in masks:  # the masks hold after the fine-tune
        assert not bool(params[n][~masks[n]].any())
    assert info["journey"]["steps"] == 3 * 8
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, back_masks, manifest = load_run(tmp_path / "run")
    assert manifest["learn"]["flops_target"] == pytest.approx(0.4)
    assert all(torch.equal(back_masks[n], masks[n]) for n in masks)
    x = data["x_test"][:8]
    torch.testing.assert_close(back(x), model.eval()(x))


def test_cli_prunes_to_the_flops_target_and_mistakes_exit_2(tmp_path):
    from tests.conftest import error_line, invoke

    args = ["train-prune", "cnn", "--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "0",
            "--train-subset", "128", "--test-subset", "32", "--batch-size", "32", "--learn", "lapp", "--quiet"]
    rc, out, err = invoke(*args, "--sparsity", "0.5", "--option", "tolerance=0.02", "--out", tmp_path / "r")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "r" / "prunekit.json").read_text())
    assert abs(manifest["learn"]["flops_ratio"] - 0.5) <= 0.02
    _, masks, _ = load_run(tmp_path / "r")
    assert masks is not None and len(masks) == 6
    for bad, word in [("lam=0", "lam must be positive"), ("temperature=-1", "temperature must be positive"),
                      ("ramp=0", "ramp must be in (0, 1]"), ("side=below", "side")]:
        rc, _, err = invoke(*args, "--option", bad, "--out", tmp_path / "bad")
        assert rc == 2 and word in error_line(err) and not (tmp_path / "bad").exists(), err
