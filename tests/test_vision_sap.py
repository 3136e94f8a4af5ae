"""PQ index + SAP (Diao et al., ICLR 2023): the index's defining properties, the keep bound on hand examples, the
``Sap`` schedule's counts and choice, and ``train-prune --schedule sap`` end to end (rounds, masks, bad options)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from prunekit.core.masks import Masks
from prunekit.errors import PruneError
from prunekit.vision.pq import SapOptions, layer_pq, pq_index, sap_keep_bound, sap_plan, sap_prune_count
from prunekit.vision.schedules import Sap

torch.set_num_threads(1)


def _direct(w: torch.Tensor, p: float, q: float) -> float:
    """The definition read literally: 1 - d^(1/q - 1/p) ||w||_p / ||w||_q (float64)."""
    w = w.double().reshape(-1)
    d = w.numel()
    norm_p = w.abs().pow(p).sum() ** (1 / p)
    norm_q = w.abs().pow(q).sum() ** (1 / q)
    return float(1 - d ** (1 / q - 1 / p) * norm_p / norm_q)


@pytest.mark.parametrize("p,q", [(0.5, 1.0), (1.0, 2.0), (0.2, 0.7)])
def test_pq_index_extremes_invariances_and_definition(p, q):
    d = 64
    one_hot = torch.zeros(d)
    one_hot[17] = -3.0
    assert pq_index(one_hot, p, q) == pytest.approx(1 - d ** (1 / q - 1 / p), rel=1e-12)  # the maximum
    assert pq_index(torch.full((d,), 0.7), p, q) == pytest.approx(0.0, abs=1e-12)  # constant: the minimum
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 40, generator=g)
    i = pq_index(w, p, q)
    assert i == pytest.approx(_direct(w, p, q), rel=1e-9)
    assert 0.0 < i < 1 - w.numel() ** (1 / q - 1 / p)
    assert pq_index(123.0 * w, p, q) == pytest.approx(i, rel=1e-6)  # scale invariance (w is float32)
    assert pq_index(-w.reshape(-1)[torch.randperm(w.numel(), generator=g)], p, q) == pytest.approx(i, rel=1e-9)
    sparser = w.clone()
    sparser[:, 10:] *= 0.01  # most of the mass in a quarter of the entries: more compressible
    assert pq_index(sparser, p, q) > i
    keep = torch.rand(w.shape, generator=g) > 0.5
    assert pq_index(w, p, q, mask=keep) == pytest.approx(_direct(w[keep], p, q), rel=1e-9)  # d = kept entries


def test_pq_index_edge_cases():
    assert pq_index(torch.zeros(10)) == 0.0 and pq_index(torch.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="0 < p < q"):
        pq_index(torch.ones(3), 1.0, 1.0)


def test_sap_keep_bound_and_prune_count_on_hand_examples():
    # d = 1000, I = 0.3, p = 0.5, q = 1, eta_r = 0.1: r = 1000 * 1.1^-2 * 0.7^1 = 578.51...
    assert sap_keep_bound(1000, 0.3, 0.5, 1.0, 0.1) == pytest.approx(1000 * 0.7 / 1.21)
    # ceil(r) = 579 kept at the bound; gamma 1.2: 1.2 * (1 - 0.579) = 0.5052 -> floor(505.2) = 505 removed
    assert sap_prune_count(1000, 0.3, 0.5, 1.0, 0.1, 1.2, 0.9) == 505
    assert sap_prune_count(1000, 0.3, 0.5, 1.0, 0.1, 3.0, 0.9) == 900  # capped by beta
    assert sap_prune_count(1000, 0.0, 0.5, 1.0, 0.0, 1.0, 0.9) == 0  # constant weights: nothing to remove
    # p = 1, q = 2: exponents -2 and 2; d = 200, I = 0.5, eta_r = 0: r = 200 * 0.25 = 50 -> 150 removed
    assert sap_keep_bound(200, 0.5, 1.0, 2.0, 0.0) == pytest.approx(50.0)
    assert sap_prune_count(200, 0.5, 1.0, 2.0, 0.0, 1.0, 0.9) == 150
    assert sap_prune_count(200, 0.5, 1.0, 2.0, 1.0, 1.0, 0.95) == 200 - math.ceil(50 / 4)  # (1 + 1)^-2 = 1/4
    assert sap_prune_count(200, 0.5, 1.0, 2.0, 1.0, 1.0, 0.9) == 180  # 187 would pass beta * d


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    with torch.no_grad():  # heavy-tailed weights, so the index says a good part can go
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.randn(m.weight.shape).abs() ** 2)
    return net


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sap_round_removes_the_bound_s_count_by_magnitude_and_rewinds(scope):
    net = _net()
    opts = SapOptions(scope=scope, gamma=1.5)
    sched = Sap(rounds=2, options=opts, rewind_step=0)
    sched.rewinder.save(net, 0)
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():  # "training" moves the weights away from the rewind point
        for p in net.parameters():
            p.add_(0.01)
    trained = {k: v.detach().clone() for k, v in net.named_parameters() if v.dim() > 1}
    masks = sched.next_round(net, 0)
    pq = layer_pq(_copy_with(net, trained), None, 0.5, 1.0)
    if scope == "global":
        d = sum(v.numel() for v in trained.values())
        assert d - masks.kept() == sap_prune_count(d, pq["global"], 0.5, 1.0, 0.0, 1.5, 0.9) > 0
        everything = torch.cat([trained[k].abs().reshape(-1) for k in trained])
        kept = torch.cat([masks[k].reshape(-1) for k in trained])
        assert everything[kept].min() >= everything[~kept].max()  # one magnitude ranking over all layers
    else:
        for k, w in trained.items():
            removed = int((~masks[k]).sum())
            assert removed == sap_prune_count(w.numel(), pq[k], 0.5, 1.0, 0.0, 1.5, 0.9) > 0
            assert w.abs()[masks[k]].min() >= w.abs()[~masks[k]].max()
    assert sched.log[0]["pq_global"] == pytest.approx(pq["global"]) and sched.targets[0] == masks.sparsity()
    for k, v in net.state_dict().items():  # rewound to step 0, the removed weights zero
        expect = w0[k] * masks[k] if k in masks else w0[k]
        torch.testing.assert_close(v, expect)
    # the next round measures only the survivors and never brings a removed weight back
    before = masks.copy()
    second = sched.next_round(net, 0)
    assert all(not (second[k] & ~before[k]).any() for k in second)
    assert second.sparsity() > before.sparsity() and sched.round == 2


def _copy_with(net: nn.Module, weights: dict) -> nn.Module:
    import copy

    out = copy.deepcopy(net)
    with torch.no_grad():
        for k, p in out.named_parameters():
            if k in weights:
                p.copy_(weights[k])
    return out


def test_sap_cap_stops_at_the_cap():
    net = _net(1)
    masks = Masks.dense(net)
    keep, row = sap_plan(net, masks, SapOptions(gamma=10.0, beta=0.9), cap=0.25)
    n = masks.numel()
    assert row["pruned"] == n - keep["*"] == math.floor(0.25 * n)
    keep, _ = sap_plan(net, masks, SapOptions(gamma=10.0, beta=0.9, scope="layer"), cap=0.25)
    assert all(m.numel() - keep[k] == math.floor(0.25 * m.numel()) for k, m in masks.items())


@pytest.mark.parametrize("opts,msg", [
    ({"p": 1.0, "q": 1.0}, "0 < p < q"), ({"p": -0.5}, "0 < p < q"), ({"eta_r": -1}, "eta_r"),
    ({"gamma": 0}, "gamma"), ({"beta": 1.0}, "beta"), ({"scope": "neuron"}, "scope"),
])
def test_bad_sap_options_are_one_sentence(opts, msg):
    from prunekit.vision.train import make_config

    with pytest.raises(PruneError, match=msg):
        make_config(schedule="sap", options=opts)


TINY = ["--dataset", "synthetic", "--train-subset", "192", "--test-subset", "64", "--epochs", "1",
        "--batch-size", "64", "--rewind-step", "0", "--no-progress"]


def test_cli_sap_runs_rounds_sparsity_grows_and_masks_are_kept(tmp_path):
    from tests.conftest import invoke

    from prunekit.vision.train import load_run

    out = tmp_path / "run"
    rc, stdout, stderr = invoke("train-prune", "cnn", "--out", out, *TINY, "--schedule", "sap", "--rounds", "3",
                                "--option", "gamma=2", "--option", "eta_r=0.001")
    assert rc == 0, stderr
    man = json.loads((out / "prunekit.json").read_text())
    sap = man["sap"]
    assert sap["gamma"] == 2 and sap["p"] == 0.5 and sap["q"] == 1.0 and sap["scope"] == "global"
    rounds = sap["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    s = [r["sparsity"] for r in rounds]
    assert 0 < s[0] < s[1] < s[2] <= 0.9  # grows every round; the recipe's sparsity (0.9) only caps it
    model, masks, _ = load_run(out)
    assert masks is not None and masks.sparsity() == pytest.approx(s[-1])
    assert man["metrics"]["sparsity"] == pytest.approx(s[-1])
    params = dict(model.named_parameters())
    assert all((params[k][~m] == 0).all() for k, m in masks.items())
    for r, prev in zip(rounds, [0.0] + s):  # each round removed what its own PQ index said, of the survivors
        assert r["alive"] == round((1 - prev) * masks.numel())
        assert r["pruned"] == sap_prune_count(r["alive"], r["pq_global"], 0.5, 1.0, 0.001, 2.0, 0.9)
        assert set(r["pq"]) == set(masks) and all(0 <= v < 1 for v in r["pq"].values())
    assert set(sap["final_pq"]) == set(masks) | {"global"}
    assert "sap round 3" in stdout and man["summary"]["journey"]["steps"] == 4 * 3  # dense + 3 rounds, 3 steps each


@pytest.mark.parametrize("args,msg", [
    (["--option", "p=1.5"], "0 < p < q"),
    (["--option", "scope=neuron"], "scope"),
    (["--option", "nope=1"], "takes the option 'nope'"),
    (["--structure", "channels"], "channel pruning supports"),
    (["--epochs", "0"], "epochs >= 1 per round"),
])
def test_cli_bad_sap_input_exit_2_nothing_written(tmp_path, args, msg):
    from tests.conftest import error_line, invoke

    out = tmp_path / "run"
    rc, _, stderr = invoke("train-prune", "cnn", "--out", out, *TINY, "--schedule", "sap", *args)
    assert rc == 2 and msg in error_line(stderr)
    assert not out.exists()


def test_lottery_rounds_unchanged_by_the_schedule_hook():
    """``lottery(schedule=None)`` still prunes to its fixed targets (the hook SAP uses changes nothing else)."""
    from prunekit.vision.schedules import lottery_sparsities
    from prunekit.vision.train import load_data, make_config, train_prune

    data = load_data("synthetic", 128, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", schedule="lottery", sparsity=0.8, rounds=2, epochs=1,
                      batch_size=64, rewind_step=0)
    _, masks, info = train_prune(cfg, progress=False, data=data)
    targets = lottery_sparsities(0.8, 2)
    assert [r["target"] for r in info["rounds"]] == targets
    assert [r["sparsity"] for r in info["rounds"]] == pytest.approx(targets, abs=1e-5)
    assert "sap" not in info and masks.sparsity() == pytest.approx(0.8, abs=1e-5)


def test_cli_sap_with_lrp_criterion_gets_batches_and_its_options(tmp_path):
    from tests.conftest import invoke

    out = tmp_path / "run"
    rc, _, stderr = invoke("train-prune", "cnn", "--out", out, *TINY, "--schedule", "sap", "--rounds", "2",
                           "--criterion", "lrp", "--option", "rule=alpha-beta", "--option", "gamma=2")
    assert rc == 0, stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert len(man["sap"]["rounds"]) == 2 and man["metrics"]["sparsity"] > 0
