"""Learner ``udfc`` (Bai et al. 2023): compensation of a removed channel that is a linear combination of the kept
ones leaves the outputs unchanged, the Gaussian moments of ReLU / ReLU6 match sampling, int8 weights are within half
a step, and a data-free train-prune run shrinks, quantizes and loads back; option mistakes are one sentence."""

from __future__ import annotations

import json

import torch
from torch import nn

from prunekit.vision.channels import prune_channels
from prunekit.vision.learn.udfc import (compensate, expected_error, find_sites, gaussian_moments, plan_removal,
                                        quantize_int8, site_terms)
from prunekit.vision.models import SmallCNN
from prunekit.vision.train import load_data, load_run, make_config, save_run, train_prune

torch.set_num_threads(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                        nn.Conv2d(6, 4, 3, padding=0, bias=False), nn.BatchNorm2d(4), nn.Flatten())
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    with torch.no_grad():  # channel 5's folded filter is a combination of channels 0 and 2
        net[0].weight[5] = 0.5 * net[0].weight[0] - 1.2 * net[0].weight[2]
    return net.eval()


def test_compensated_removal_of_a_linear_combination_is_exact():
    net = _net()
    x = torch.randn(3, 2, 9, 9)
    with torch.no_grad():
        before = net(x)
    (site,) = find_sites(net, torch.randn(1, 2, 9, 9))
    assert (site.producer, site.act, site.consumer, site.after) == ("0", "identity", "2", "3")
    terms = site_terms(net, site)
    residual = compensate(net, site, [5], terms, ridge=0.0)
    assert residual < 1e-6
    prune_channels(net, x[:1], remove={"0": [5]})
    assert net[0].out_channels == 5 and net[2].in_channels == 5
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    # plain removal of the same channel changes the outputs
    plain = _net()
    prune_channels(plain, x[:1], remove={"0": [5]})
    with torch.no_grad():
        assert float((plain(x) - before).abs().max()) > 1e-2


def test_expected_error_by_hand_and_the_global_plan_spares_what_cannot_be_rebuilt():
    net = _net()
    with torch.no_grad():  # independent filters for the by-hand check (a singular Gram inverts badly)
        net[0].weight[5] = torch.randn_like(net[0].weight[5])
    (site,) = find_sites(net, torch.randn(1, 2, 9, 9))
    err, total = expected_error(net, site, site_terms(net, site), ridge=0.0)
    # identity activation: err_p = ||V_p||^2 gamma_p^2 rho_p, rho_p = the relative residual of G_p on the others
    a0 = net[1].weight / torch.sqrt(net[1].running_var + net[1].eps)
    g = (a0[:, None] * net[0].weight.flatten(1)).double().detach()
    vn = net[2].weight.detach().double().transpose(0, 1).flatten(1).pow(2).sum(1)
    gamma2 = net[1].weight.detach().double() ** 2
    for p in range(6):
        others = [j for j in range(6) if j != p]
        coef = torch.linalg.lstsq(g[others].T, g[p]).solution
        rho = float((g[p] - g[others].T @ coef).pow(2).sum() / g[p].pow(2).sum())
        torch.testing.assert_close(float(err[p]), float(vn[p] * gamma2[p]) * rho, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(total, (vn * gamma2).sum())
    net = _net()
    (site,) = find_sites(net, torch.randn(1, 2, 9, 9))
    terms = site_terms(net, site)
    err, total = expected_error(net, site, terms, ridge=1e-9)
    assert float(err[5]) < 1e-6 * float(total)  # 5 is a combination of 0 and 2: nothing lost
    plan = plan_removal(net, [site], {site.producer: terms}, 1 / 6, "error", "global", 1e-9, 0.5)
    assert plan == {"0": [5]}


def test_gaussian_moments_match_sampling():
    torch.manual_seed(0)
    beta = torch.tensor([0.5, -1.0, 3.0, 7.0], dtype=torch.float64)
    gamma = torch.tensor([1.0, 2.0, 2.5, 1.0], dtype=torch.float64)
    y = beta[:, None] + gamma[:, None] * torch.randn(4, 400000, dtype=torch.float64)
    for act, f, top in (("relu", torch.relu, float("inf")), ("relu6", lambda t: t.clamp(0, 6), 6.0)):
        m, kappa, var = gaussian_moments(beta, gamma, act)
        a = f(y)
        torch.testing.assert_close(m, a.mean(1), atol=0.02, rtol=0.01)
        torch.testing.assert_close(kappa, ((y > 0) & (y < top)).double().mean(1), atol=0.01, rtol=0.01)
        torch.testing.assert_close(var, a.var(1), atol=0.03, rtol=0.02)
    m, kappa, var = gaussian_moments(beta, gamma, "identity")
    assert torch.equal(m, beta) and torch.equal(kappa, torch.ones(4, dtype=torch.float64))


def test_int8_error_is_at_most_half_a_step():
    model = SmallCNN(10, 8)
    w = model.features[0].weight.detach().clone()
    rep = quantize_int8(model)
    scale = w.flatten(1).abs().amax(1).view(-1, 1, 1, 1) / 127
    q = model.features[0].weight.detach()
    assert float(((q - w).abs() / scale).max()) <= 0.5 + 1e-5 and rep["max_error_over_scale"] <= 0.5 + 1e-5
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-4)  # on the int8 grid
    n = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert rep["weights_int8_bytes"] == n + 4 * sum(p.shape[0] for p in model.parameters() if p.dim() > 1)


def test_learner_is_data_free_and_the_run_loads_back(tmp_path):
    data = load_data("synthetic", 64, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=0, learn="udfc", sparsity=0.25,
                      options={"allocation": "uniform", "select": "l1"})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    L = info["learn"]
    assert masks is None and info["journey"]["steps"] == 0  # no training at all
    assert set(L["sites"]) == {"features.0", "features.7"} and all(s["removed"] == s["channels"] // 4 for s in L["sites"].values())
    # the default: error-ranked, global over the sites, at most max_site_ratio of one
    g, _, gi = train_prune(make_config(model="cnn", dataset="synthetic", epochs=0, learn="udfc", sparsity=0.2),
                           progress=False, data=data)
    sites = gi["learn"]["sites"]
    n = sum(s["channels"] for s in L["sites"].values())
    assert sum(s["removed"] for s in sites.values()) == round(0.2 * n)
    assert all(s["removed"] <= int(0.3 * s["channels"]) for s in sites.values())
    assert L["quantization"]["max_error_over_scale"] <= 0.5 + 1e-5 and L["bytes_after"] < L["bytes_fp32_before"] / 3
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, _, _ = load_run(tmp_path / "run")
    x = data["x_test"][:8]
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x), rtol=0, atol=0)


def test_cli_and_mistakes_exit_2(tmp_path):
    from tests.conftest import error_line, invoke

    args = ["train-prune", "cnn", "--dataset", "synthetic", "--epochs", "0", "--train-subset", "64",
            "--test-subset", "32", "--learn", "udfc", "--quiet"]
    rc, out, err = invoke(*args, "--sparsity", "0.5", "--option", "allocation=uniform", "--out", tmp_path / "r")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "r" / "prunekit.json").read_text())
    assert manifest["shapes"]["features.0.weight"][0] == 16 and manifest["learn"]["quantization"]
    rc, _, err = invoke(*args, "--sparsity", "0.5", "--out", tmp_path / "bad")  # global, capped at 0.3 per site
    assert rc == 2 and "max_site_ratio" in error_line(err) and not (tmp_path / "bad").exists(), err
    for bad, word in [("ridge=-1", "ridge must be >= 0"), ("select=random", "select"), ("min_slope=2", "min_slope"),
                      ("max_site_ratio=1", "max_site_ratio"), ("select=l1", "use select=error")]:
        rc, _, err = invoke(*args, "--option", bad, "--out", tmp_path / "bad")
        assert rc == 2 and word in error_line(err) and not (tmp_path / "bad").exists(), err
    rc, _, err = invoke(*[a if a != "cnn" else "vit" for a in args], "--out", tmp_path / "bad")
    assert rc == 2 and "udfc found no channel" in error_line(err) and not (tmp_path / "bad").exists()
