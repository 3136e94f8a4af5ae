"""Learner ``trp`` (Xu et al. 2020): the energy rank by hand, the nuclear norm and its sub-gradient, the two-layer
decomposition equal to the truncated-SVD product, a train-prune run that decomposes and loads back, and option
mistakes as one sentence with exit 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from prunekit.vision.channels import count_macs
from prunekit.vision.learn.trp import decompose, energy_rank, nuclear, saves_macs, truncate_
from prunekit.vision.models import SmallCNN
from prunekit.vision.train import load_data, load_run, make_config, save_run, train_prune

torch.set_num_threads(1)


def test_energy_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert energy_rank(s, 0.5) == 1 and energy_rank(s, 0.9) == 2 and energy_rank(s, 0.93) == 3
    assert energy_rank(s, 9 / 14) == 1 and energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(4), 0.9) == 1


def test_nuclear_value_and_subgradient():
    torch.manual_seed(0)
    m = nn.Conv2d(3, 5, 3)
    r = nuclear([m])
    w = m.weight.detach().reshape(5, -1)
    torch.testing.assert_close(r, torch.linalg.matrix_norm(w, "nuc"))
    r.backward()
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(m.weight.grad.reshape(5, -1), u @ vh)


def _truncated(m: nn.Module, r: int) -> torch.Tensor:
    w = m.weight.detach().reshape(m.weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] @ torch.diag(s[:r]) @ vh[:r]).float().reshape(m.weight.shape)


@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True), torch.randn(2, 6, 9, 9)),
    (nn.Conv2d(4, 8, (3, 1), padding=(1, 0), dilation=1, bias=False), torch.randn(2, 4, 7, 7)),
    (nn.Linear(20, 12), torch.randn(3, 5, 20)),
])
def test_decomposed_layers_equal_the_truncated_svd_product(layer, x):
    torch.manual_seed(0)
    for r in (1, 3):
        seq = decompose(layer, r)
        ref = copy.deepcopy(layer)  # the layer with its weight replaced by the rank-r truncated SVD
        ref.weight = nn.Parameter(_truncated(layer, r))
        with torch.no_grad():
            torch.testing.assert_close(seq(x), ref(x), rtol=0, atol=1e-5)
        first, second = seq
        assert first.weight.shape[0] == r and second.weight.shape[1] == r
        out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        assert saves_macs(layer, r) == (r * (fan_in + out) < out * fan_in)


def test_truncation_keeps_the_energy_rank_and_the_whole_model_matches():
    torch.manual_seed(0)
    model = SmallCNN(10, 8).eval()
    x = torch.randn(2, 1, 28, 28)
    conv = model.features[3]
    r = truncate_(conv, 0.9)
    assert int(torch.linalg.matrix_rank(conv.weight.detach().reshape(8, -1))) == r < 8
    with torch.no_grad():
        before = model(x)
        model.features[3] = decompose(conv, r)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    # MACs of the two layers: r x (in*9 + out) per output position (28 x 28)
    assert count_macs(model, x[:1]) == count_macs(SmallCNN(10, 8), x[:1]) - 784 * 8 * 72 + 784 * r * (72 + 8)


def test_learner_decomposes_and_the_run_loads_back(tmp_path):
    data = load_data("synthetic", 256, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=1, finetune_epochs=1, batch_size=32, learn="trp",
                      options={"energy": 0.9, "period": 4, "lam": 1e-3, "speed_batch": 16, "speed_repeats": 1})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    L = info["learn"]
    assert masks is None and L["layers_decomposed"] >= 5 and L["macs_after"] < L["macs_before"]
    assert L["params_after"] == info["metrics"]["params"] < L["params_before"]
    mods = dict(model.named_modules())
    for name, row in L["layers"].items():
        assert row["rank"] <= row["full_rank"]
        if row["decomposed"]:
            assert isinstance(mods[name], nn.Sequential) and mods[name][0].weight.shape[0] == row["rank"]
    assert L["speed"]["batch"] == 16 and L["speed"]["speedup"] > 0
    assert info["journey"]["steps"] == 2 * 8
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, _, manifest = load_run(tmp_path / "run")
    assert manifest["learn"]["macs_after"] == L["macs_after"]
    x = data["x_test"][:8]
    torch.testing.assert_close(back(x), model.eval()(x))


def test_cli_decomposes_and_mistakes_exit_2(tmp_path):
    from tests.conftest import error_line, invoke

    args = ["train-prune", "cnn", "--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "0",
            "--train-subset", "128", "--test-subset", "32", "--batch-size", "64", "--learn", "trp", "--quiet"]
    rc, out, err = invoke(*args, "--option", "energy=0.8", "--option", "speed_repeats=0", "--out", tmp_path / "r")
    assert rc == 0, err
    assert "test accuracy before trp's removal" in out
    manifest = json.loads((tmp_path / "r" / "prunekit.json").read_text())
    assert manifest["learn"]["energy"] == 0.8 and manifest["learn"]["speed"] is None
    assert "features.3.0.weight" in manifest["shapes"]
    model, _, _ = load_run(tmp_path / "r")
    assert sum(p.numel() for p in model.parameters()) == manifest["learn"]["params_after"] < 468010
    for bad, word in [("energy=0", "energy must be in (0, 1]"), ("period=0", "period must be at least 1"),
                      ("lam=-1", "lam must be >= 0"), ("finetune_lr=2", "finetune_lr must be in (0, 1]"),
                      ("rank=3", "takes the option 'rank'")]:
        rc, _, err = invoke(*args, "--option", bad, "--out", tmp_path / "bad")
        assert rc == 2 and word in error_line(err) and not (tmp_path / "bad").exists(), err
    rc, _, err = invoke(*args, "--exclude", "nowhere", "--out", tmp_path / "bad")
    assert rc == 2 and "No module named 'nowhere'" in error_line(err) and not (tmp_path / "bad").exists()
