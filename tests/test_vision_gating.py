"""Learner ``gating`` (Fire Together Wire Together, Elkerdawy et al. 2022): open gates give the dense model exactly,
the batch-1 skip execution equals the masked one, the heat-map targets and the executed-MACs count by hand (and
equal to the statically pruned network's MACs), a train-prune run that learns its gates and loads back, and option
mistakes as one sentence with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.vision.channels import count_macs, prune_channels
from prunekit.vision.learn.gating import (executed_macs, feeds_of, gate_report, gateable, gated_convs,
                                          install_gates, layer_plan, set_gates, strip_gates, target_mask)
from prunekit.vision.models import SmallCNN, SmallResNet
from prunekit.vision.train import load_data, load_run, make_config, save_run, train_prune

torch.set_num_threads(1)


def _norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.1)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model.eval()


def _gated(model, x):
    pairs = gateable(model, x)
    plan = layer_plan(model, x, pairs)
    install_gates(model, pairs, feeds_of(plan, pairs))
    return pairs, plan


@pytest.mark.parametrize("make", [lambda: SmallCNN(10, 8), lambda: SmallResNet(10, 8)])
def test_all_gates_open_equal_the_dense_model_exactly(make):
    torch.manual_seed(0)
    model = _norms(make())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        dense = model(x)
    _gated(model, x)
    for c in gated_convs(model).values():  # predictors that would close gates at the default threshold
        torch.nn.init.normal_(c.gate.weight)
        c.gate.bias.data.fill_(-3.0)
    set_gates(model, threshold=-1.0)
    with torch.no_grad():
        assert torch.equal(model(x), dense)
        set_gates(model, skip=True)
        torch.testing.assert_close(torch.cat([model(x[i:i + 1]) for i in range(5)]), dense)
        assert torch.equal(strip_gates(model)(x), dense)
    set_gates(model, threshold=0.5, skip=False)
    with torch.no_grad():
        assert not torch.allclose(model(x), dense)


@pytest.mark.parametrize("make", [lambda: SmallCNN(10, 8), lambda: SmallResNet(10, 8)])
def test_skip_execution_equals_the_masked_model(make):
    torch.manual_seed(1)
    model = _norms(make())
    x = torch.randn(6, 1, 28, 28) + 0.5
    pairs, _ = _gated(model, x)
    for c in gated_convs(model).values():
        torch.nn.init.normal_(c.gate.weight, std=2.0)
        torch.nn.init.normal_(c.gate.bias)
    with torch.no_grad():
        masked = model(x)
        closed = {n: float((~c.gate_keep).float().mean()) for n, c in gated_convs(model).items()}
        assert 0.1 < sum(closed.values()) / len(closed) < 0.9  # a real mix of open and closed gates
        set_gates(model, skip=True)
        skipped = torch.cat([model(x[i:i + 1]) for i in range(6)])
        for c in gated_convs(model).values():  # every gate of one layer closed: still exact
            c.gate.bias.data.fill_(-1e4)
            break
        one = model(x[:1])
        set_gates(model, skip=False)
        torch.testing.assert_close(one, model(x[:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skipped, masked, rtol=1e-5, atol=1e-5)


def test_heat_map_targets_by_hand():
    heat = torch.tensor([[0.1, 0.5, 0.2, 0.2], [4.0, 0.0, 1.0, 5.0]])
    torch.testing.assert_close(target_mask(heat, "topk", 0.5), torch.tensor([[0., 1, 1, 0], [1, 0, 0, 1]]))
    torch.testing.assert_close(target_mask(heat, "topk", 0.01), torch.tensor([[0., 1, 0, 0], [0, 0, 0, 1]]))
    # mass 0.6: row 0 shares sorted 0.5, 0.7 -> 2 channels (tie 0.2/0.2: lower index first); row 1: 0.5, 0.9 -> 2
    torch.testing.assert_close(target_mask(heat, "mass", 0.6), torch.tensor([[0., 1, 1, 0], [1, 0, 0, 1]]))
    torch.testing.assert_close(target_mask(heat, "mass", 1.0), torch.tensor([[1., 1, 1, 1], [1, 0, 1, 1]]))


def test_executed_macs_by_hand_equal_the_statically_pruned_network():
    torch.manual_seed(0)
    model = _norms(SmallCNN(10, 4))
    x = torch.randn(2, 1, 28, 28)
    pairs = gateable(model, x)
    assert pairs == {"features.0": "features.1", "features.3": "features.4", "features.7": "features.8",
                     "features.10": "features.11"}
    plan = layer_plan(model, x, pairs)
    kept = {"features.1": [0, 2], "features.4": [0, 1, 2, 3], "features.8": [1, 3, 5, 7], "features.11": [4, 6]}
    keep = {bn: torch.zeros(1, model.get_submodule(bn).num_features) for bn in kept}
    for bn, idx in kept.items():
        keep[bn][0, idx] = 1
    # conv 1->4 at 28x28 (2 of 4 out), 4->4 (all out, 2 of 4 in), 4->8 at 14x14 (4 of 8 out), 8->8 (2 of 8 out,
    # 4 of 8 in), fc 392->128 (2 of 8 channels x 49 features in), fc 128->10
    by_hand = (784 * 9 * 2) + (784 * 9 * 4 * 2) + (196 * 9 * 4 * 4) + (196 * 9 * 2 * 4) + (2 * 49 * 128) + 1280
    assert float(executed_macs(plan, keep)[0]) == by_hand == 126720
    remove = {bn: [c for c in range(model.get_submodule(bn).num_features) if c not in idx] for bn, idx in kept.items()}
    prune_channels(model, x, remove={k: v for k, v in remove.items() if v})
    assert count_macs(model, x[:1]) == by_hand


def test_learner_learns_gates_reports_macs_and_loads_back(tmp_path):
    data = load_data("synthetic", 256, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=1, finetune_epochs=1, batch_size=32,
                      learn="gating", sparsity=0.5, options={"speed_images": 4})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    L = info["learn"]
    assert masks is None and set(L["gated"]) == {"features.0", "features.3", "features.7", "features.10"}
    assert L["macs_dense"] == 18691840 and L["macs_executed"] < 0.9 * L["macs_dense"]  # the gates learnt to close
    assert L["macs_ratio"] == pytest.approx((L["macs_executed"] + L["macs_predictors"]) / L["macs_dense"])
    assert min(L["open_fraction"].values()) < 1.0 and L["speed"]["images"] == 4 and L["speed"]["speedup"] > 0
    assert info["journey"]["steps"] == 2 * 8
    again = gate_report(model, layer_plan(strip_gates(model), data["x_train"][:2], L["gated"]), L["gated"],
                        data["x_test"])
    assert again["macs_executed"] == L["macs_executed"]
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, _, manifest = load_run(tmp_path / "run")
    assert manifest["learn"]["gated"] == L["gated"]
    x = data["x_test"][:8]
    assert torch.equal(back(x), model.eval()(x))
    assert "features.0.gate.weight" in back.state_dict()


def test_cli_gates_and_mistakes_exit_2(tmp_path):
    from tests.conftest import error_line, invoke

    args = ["train-prune", "resnet", "--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "1",
            "--train-subset", "128", "--test-subset", "32", "--batch-size", "64", "--learn", "gating", "--quiet",
            "--sparsity", "0.5"]
    rc, out, err = invoke(*args, "--option", "speed_images=2", "--option", "target=mass", "--out", tmp_path / "r")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "r" / "prunekit.json").read_text())
    assert manifest["learn"]["target"] == "mass" and set(manifest["learn"]["gated"]) == {
        "layers.0.conv1", "layers.1.conv1", "layers.2.conv1"}
    model, _, _ = load_run(tmp_path / "r")
    assert len(gated_convs(model)) == 3
    for bad, word in [("lam=0", "lam must be positive"), ("threshold=1.5", "threshold must be in (0, 1)"),
                      ("target=half", "target"), ("mass=2", "mass must be in")]:
        rc, _, err = invoke(*args, "--option", bad, "--out", tmp_path / "bad")
        assert rc == 2 and word in error_line(err) and not (tmp_path / "bad").exists(), err
    rc, _, err = invoke(*[a if a != "resnet" else "vit" for a in args], "--out", tmp_path / "bad")
    assert rc == 2 and "Gating needs convolutions" in error_line(err) and not (tmp_path / "bad").exists()
