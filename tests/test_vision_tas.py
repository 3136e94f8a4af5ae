"""Learner ``tas`` (Dong & Yang 2019): a one-hot distribution on 100 % gives the dense forward exactly, the expected
MACs of a one-hot choice equal the physically built network's, the FLOPs loss alone drives the argmax widths into
the target band, the fit rule, a train-prune run that meets its MACs target and loads back, and option mistakes as
one sentence with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.vision.channels import count_macs, prune_channels
from prunekit.vision.learn.gating import gateable, layer_plan
from prunekit.vision.learn.tas import WidthSearch
from prunekit.vision.models import SmallCNN, SmallResNet
from prunekit.vision.train import load_data, load_run, make_config, save_run, train_prune

torch.set_num_threads(1)
WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _search(model, x):
    pairs = gateable(model, x)
    s = WidthSearch(model, pairs, layer_plan(model, x, pairs), WIDTHS, sample=2)
    s.attach()
    return s


@pytest.mark.parametrize("make", [lambda: SmallCNN(10, 8), lambda: SmallResNet(10, 8)])
def test_one_hot_on_full_width_is_the_dense_forward(make):
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(1)
    dense = model(x)
    s = _search(model, x)
    with torch.no_grad():
        for a in s.alphas:
            a.copy_(torch.tensor([-1e4, -1e4, -1e4, 0.0]))
    s.tau = 0.5
    torch.manual_seed(1)
    assert torch.equal(model(x), dense)  # sampled (training) forward
    model.eval()
    s.remove()
    ref = model(x)
    s.attach()
    with torch.no_grad():
        s.alphas[0].copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))  # half width in the first layer: not dense
    assert not torch.allclose(model(x), ref)


def test_expected_macs_of_a_choice_equal_the_built_network():
    torch.manual_seed(0)
    model = SmallResNet(10, 8).eval()
    x = torch.randn(2, 1, 28, 28)
    s = _search(model, x)
    choice = {"layers.0.bn1": 1, "layers.1.bn1": 0, "layers.2.bn1": 2}  # 4 of 8, 4 of 16, 24 of 32 channels
    with torch.no_grad():
        for i, bn in enumerate(s.bns):
            s.alphas[i].copy_(torch.nn.functional.one_hot(torch.tensor(choice[bn]), 4).float() * 1e4)
    assert float(s.expected_macs().detach()) == pytest.approx(s.macs(choice), rel=1e-6)
    assert s.choice() == choice
    s.remove()
    prune_channels(model, x, remove={bn: list(range(s.counts[bn][j], s.channels[bn])) for bn, j in choice.items()})
    assert [model.layers[i].conv1.out_channels for i in range(3)] == [4, 4, 24]
    assert count_macs(model, x[:1]) == s.macs(choice)


def test_flops_loss_pulls_toward_the_target_band_and_fit_lands_in_it():
    torch.manual_seed(0)
    model = SmallCNN(10, 8).eval()
    x = torch.randn(2, 1, 28, 28)
    s = _search(model, x)
    target = 0.45 * s.dense

    def set_all(v):
        with torch.no_grad():
            for a in s.alphas:
                a.copy_(torch.tensor(v))

    set_all([0.0, 0.0, 0.0, 1.0])  # argmax full width: above the band, the loss is log E[F]
    loss = s.cost_loss(target, 0.1)
    assert float(loss.detach()) == pytest.approx(float(torch.log(s.expected_macs().detach() / s.dense)))
    loss.backward()
    assert all(float(a.grad[3]) > 0 > float(a.grad[0]) for a in s.alphas)  # descent moves mass to narrow widths
    s.opt.zero_grad(set_to_none=True)
    seen = [s.macs(s.choice())]
    while seen[-1] > 1.1 * target and len(seen) < 300:  # the FLOPs loss alone: the argmax MACs only go down
        s.cost_loss(target, 0.1).backward()
        s.step()
        seen.append(s.macs(s.choice()))
    assert seen[-1] <= 1.1 * target < seen[0] and all(b <= a for a, b in zip(seen, seen[1:]))
    set_all([1.0, 0.0, 0.0, 0.0])  # argmax quarter width: below the band, the loss is -log E[F]
    loss = s.cost_loss(target, 0.1)
    assert float(loss.detach()) == pytest.approx(-float(torch.log(s.expected_macs().detach() / s.dense)))
    set_all([0.0, 0.1, 0.2, 0.3])  # fit: from a full-width argmax, single steps down until within the band
    choice, steps = s.fit(target, 0.1)
    assert steps > 0 and 0.9 * target <= s.macs(choice) <= 1.1 * target


def test_learner_meets_its_macs_target_and_loads_back(tmp_path):
    data = load_data("synthetic", 256, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=1, finetune_epochs=1, batch_size=32,
                      learn="tas", options={"macs_target": 0.3, "tolerance": 0.1, "search_epochs": 1})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    L = info["learn"]
    assert masks is None and L["macs_before"] == 18691840
    assert L["macs_after"] == L["macs_chosen"] == count_macs(model, data["x_train"][:1])
    assert abs(L["macs_after"] / L["macs_before"] - 0.3) <= 0.1 * 0.3
    assert L["params_after"] == info["metrics"]["params"] < L["params_before"]
    kept = {bn: v["kept"] for bn, v in L["layers"].items()}
    assert kept == {bn: model.get_submodule(bn).num_features for bn in kept}
    assert all(v["kept"] in [round(w * v["channels"]) for w in WIDTHS] for v in L["layers"].values())
    assert info["journey"]["steps"] == 3 * 8  # dense, search, distillation
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, _, manifest = load_run(tmp_path / "run")
    assert manifest["learn"]["macs_after"] == L["macs_after"]
    x = data["x_test"][:8]
    assert torch.equal(back(x), model.eval()(x))


def test_cli_searches_and_mistakes_exit_2(tmp_path):
    from tests.conftest import error_line, invoke

    args = ["train-prune", "resnet", "--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "1",
            "--train-subset", "128", "--test-subset", "32", "--batch-size", "64", "--learn", "tas", "--quiet"]
    rc, out, err = invoke(*args, "--option", "macs_target=0.5", "--option", "tolerance=0.2", "--out", tmp_path / "r")
    assert rc == 0, err
    assert "test accuracy before tas's removal" in out
    manifest = json.loads((tmp_path / "r" / "prunekit.json").read_text())
    assert abs(manifest["learn"]["macs_after"] / manifest["learn"]["macs_before"] - 0.5) <= 0.2 * 0.5
    model, _, _ = load_run(tmp_path / "r")
    assert sum(p.numel() for p in model.parameters()) == manifest["learn"]["params_after"]
    for bad, word in [("macs_target=1.5", "macs_target must be in (0, 1)"), ("widths=[0.5,0.25,1.0]", "widths"),
                      ("sample=9", "sample must be in"), ("macs_target=0.01", "below what the smallest widths")]:
        rc, _, err = invoke(*args, "--option", bad, "--out", tmp_path / "bad")
        assert rc == 2 and word in error_line(err) and not (tmp_path / "bad").exists(), err
    rc, _, err = invoke(*[a if a != "resnet" else "vit" for a in args], "--out", tmp_path / "bad")
    assert rc == 2 and "TAS needs convolutions" in error_line(err) and not (tmp_path / "bad").exists()
