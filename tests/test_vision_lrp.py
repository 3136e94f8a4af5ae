"""Pruning by Explaining (criterion ``lrp``): the rules against hand computation, relevance conservation, the scores
through the criteria registries, and ``train-prune --criterion lrp`` end to end (weights, channels, bad options)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunekit.core.masks import Masks
from prunekit.errors import PruneError
from prunekit.vision.lrp import input_relevance, lrp_scores

torch.set_num_threads(1)


def _sign(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z >= 0, 1.0, -1.0)


def test_epsilon_rule_of_one_linear_layer_by_hand():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)  # its bias is ignored by the rule (z without bias), as in the paper's code
    x = torch.randn(2, 5)
    y = torch.tensor([1, 2])
    eps = 0.05  # large enough that the stabilizer visibly matters
    w = lin.weight.detach()
    hand_in, hand_w = torch.zeros(2, 5), torch.zeros(3, 5)
    for n in range(2):
        z = w @ x[n]
        r_out = torch.zeros(3)
        r_out[y[n]] = 1.0  # each sample's relevance starts as 1 at its true class
        r_ij = x[n][None, :] * w / (z + eps * _sign(z))[:, None] * r_out[:, None]  # R_ij = a_j w_ij / (z_i + eps sign z_i) R_i
        hand_in[n] = r_ij.sum(0)
        hand_w += r_ij.abs()
    got_in = input_relevance(lin, x, y, rule="epsilon", epsilon=eps)
    torch.testing.assert_close(got_in, hand_in, rtol=1e-5, atol=1e-6)
    got_w = lrp_scores(lin, ["weight"], [(x[:1], y[:1]), (x[1:], y[1:])], rule="epsilon", epsilon=eps)["weight"]
    torch.testing.assert_close(got_w, hand_w, rtol=1e-5, atol=1e-6)
    # one batch of both samples gives the same sums; rows of classes never targeted get nothing
    both = lrp_scores(lin, ["weight"], [(x, y)], rule="epsilon", epsilon=eps)["weight"]
    torch.testing.assert_close(both, hand_w, rtol=1e-5, atol=1e-6)
    assert (both[0] == 0).all() and (both[1:] > 0).all()


def test_alpha_beta_rule_of_a_convolution_by_hand():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 3, 1, bias=True)  # 1x1 convolution on a 1x1 image: z_i = sum_j a_j w_ij
    x = torch.randn(1, 4, 1, 1)  # inputs of both signs
    x[0, 0] = x[0, 0].abs() + 0.5
    x[0, 1] = -x[0, 1].abs() - 0.5
    with torch.no_grad():  # the target row gets contributions of both signs (else beta has nothing to take)
        conv.weight[2, :2] = 0.5
    y = torch.tensor([2])
    net = nn.Sequential(conv, nn.Flatten())
    eps = 1e-6
    w = conv.weight.detach()[:, :, 0, 0]
    a = x[0, :, 0, 0]
    zij = w * a[None, :]
    zp, zn = zij.clamp(min=0), zij.clamp(max=0)
    r_out = torch.tensor([0.0, 0.0, 1.0])
    r_ij = (2 * zp / (zp.sum(1, keepdim=True) + eps) - zn / (zn.sum(1, keepdim=True) - eps)) * r_out[:, None]
    got_in = input_relevance(net, x, y)  # default: alpha 2, beta 1 on convolutions
    torch.testing.assert_close(got_in[0, :, 0, 0], r_ij.sum(0), rtol=1e-5, atol=1e-6)
    assert got_in.sum().item() == pytest.approx(1.0, abs=1e-4)  # alpha - beta = 1: conserved
    got_w = lrp_scores(net, ["0.weight"], [(x, y)])["0.weight"]
    torch.testing.assert_close(got_w[:, :, 0, 0], r_ij.abs(), rtol=1e-5, atol=1e-6)
    alpha3 = input_relevance(net, x, y, alpha=3.0)  # beta follows alpha: still conserved, different split
    assert alpha3.sum().item() == pytest.approx(1.0, abs=1e-4) and not torch.allclose(alpha3, got_in)


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():  # BatchNorm statistics other than the defaults: pass-through must not scale relevance
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 2)
    return net.eval()


def test_relevance_is_conserved_through_a_relu_net_under_epsilon():
    net = _small_net()
    x = torch.randn(6, 1, 10, 10)
    y = torch.arange(6) % 5
    r = input_relevance(net, x, y, rule="epsilon", epsilon=1e-9)
    assert r.shape == x.shape
    torch.testing.assert_close(r.sum((1, 2, 3)), torch.ones(6), rtol=0, atol=1e-3)
    assert r.abs().sum() > 1.5 * 6  # positive and negative evidence, not a trivial spread
    big = input_relevance(net, x, y, rule="epsilon", epsilon=10.0)  # a large stabilizer absorbs relevance
    assert (big.sum((1, 2, 3)).abs() < 0.9).all()


def test_scores_through_the_registry_options_and_masks():
    from prunekit.vision.criteria import CRITERIA, score

    net = _small_net()
    batches = [(torch.randn(8, 1, 10, 10), torch.randint(0, 5, (8,))) for _ in range(2)]
    names = ["0.weight", "4.weight", "8.weight", "10.weight"]
    ab = score(net, "lrp", names, batches=batches)
    ep = score(net, "lrp", names, batches=batches, options={"rule": "epsilon"})
    assert set(ab) == set(names) and all(ab[k].shape == dict(net.named_parameters())[k].shape for k in names)
    assert all((v >= 0).all() and v.sum() > 0 for v in ab.values())
    assert not torch.allclose(ab["4.weight"], ep["4.weight"])  # convolutions differ by rule
    assert "rule" in CRITERIA.get("lrp").params.model_fields
    keep = {k: torch.rand(dict(net.named_parameters())[k].shape) > 0.5 for k in names}
    masked = score(net, "lrp", names, batches=batches, masks=Masks(keep))
    assert all(torch.isinf(masked[k][~keep[k]]).all() for k in names)
    assert not torch.allclose(masked["8.weight"][keep["8.weight"]], ab["8.weight"][keep["8.weight"]])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # scoring changed nothing
    with pytest.raises(PruneError, match="reference samples|training batches"):
        score(net, "lrp", names, batches=None)
    with pytest.raises(PruneError, match="linear and convolution"):
        lrp_scores(net, ["1.weight"], batches)  # a BatchNorm weight
    with pytest.raises(PruneError, match="rule"):
        lrp_scores(net, names, batches, rule="gamma")


TINY = ["--dataset", "synthetic", "--train-subset", "128", "--test-subset", "64", "--epochs", "1",
        "--finetune-epochs", "1", "--batch-size", "64", "--no-progress"]


def test_cli_weights_with_lrp(tmp_path):
    from tests.conftest import invoke

    from prunekit.vision.train import load_run

    out = tmp_path / "run"
    rc, stdout, stderr = invoke("train-prune", "cnn", "--out", out, *TINY, "--criterion", "lrp", "--sparsity", "0.8",
                                "--option", "rule=epsilon")
    assert rc == 0, stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["criterion"] == "lrp" and man["recipe"]["options"]["rule"] == "epsilon"
    model, masks, _ = load_run(out)
    assert masks.sparsity() == pytest.approx(0.8, abs=1e-4)
    params = dict(model.named_parameters())
    assert all((params[k][~m] == 0).all() for k, m in masks.items())
    assert "right after pruning" in stdout


def test_cli_channels_with_lrp(tmp_path):
    from tests.conftest import invoke

    out = tmp_path / "run"
    rc, stdout, stderr = invoke("train-prune", "cnn", "--out", out, *TINY, "--criterion", "lrp", "--structure",
                                "channels", "--sparsity", "0.5")
    assert rc == 0, stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["options"]["rule"] == "alpha-beta"  # the paper's default
    assert "channels: parameters" in stdout
    before, after = [int(s.replace(",", "")) for s in stdout.split("channels: parameters ")[1].split()[0:3:2]]
    assert after < 0.5 * before


@pytest.mark.parametrize("args,msg", [
    (["--option", "rule=gamma"], "rule"),
    (["--option", "alpha=0.5"], "alpha must be >= 1"),
    (["--structure", "channels", "--option", "epsilon=0"], "epsilon"),
])
def test_cli_bad_lrp_option_is_one_sentence_exit_2(tmp_path, args, msg):
    from tests.conftest import error_line, invoke

    out = tmp_path / "run"
    rc, _, stderr = invoke("train-prune", "cnn", "--out", out, *TINY, "--criterion", "lrp", *args)
    assert rc == 2 and msg in error_line(stderr)
    assert not out.exists()
