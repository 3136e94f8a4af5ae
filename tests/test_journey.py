"""Journey accounting (Jin et al. 2025): the live-parameter count at every optimizer step and its average, in the
shared loop, in every train-prune schedule, in the run record and in the report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from prunekit import io
from prunekit.core import journey as J
from prunekit.core.journey import Journey, live_parameters
from prunekit.core.loop import make_optimizer, train_loop
from prunekit.core.masks import Masks
from prunekit.evaluate.html_report import build_report
from prunekit.vision.schedules import Gradual, pruner
from prunekit.vision.train import load_data, make_config, train_epochs
from prunekit.zoo.nets import SmallCNN
from tests.conftest import invoke
from tests.test_report import Tree, images, runs_table

torch.set_num_threads(1)

TINY = ["--dataset", "synthetic", "--train-subset", "96", "--test-subset", "32", "--batch-size", "32",
        "--epochs", "1", "--finetune-epochs", "1", "--quiet"]


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 4))  # 128 + 32 weights, 4 biases


def removed(sparsity: float, prunable: int) -> int:
    """Weights a mask at ``sparsity`` removes of ``prunable`` (kept = round((1 - s) * P), the one "how many" rule)."""
    return prunable - round((1.0 - sparsity) * prunable)


def per_step_average(total: int, steps: int, events: list[tuple[int, float]], prunable: int) -> float:
    """The mean over ``steps`` steps of the live count: ``total`` minus what the last mask event at or before the
    step removed (``events``: (step, achieved sparsity))."""
    live = []
    for t in range(steps):
        s = max((e for e in events if e[0] <= t), default=(0, 0.0))[1]
        live.append(total - round(s * prunable))
    return sum(live) / steps


# ------------------------------------------------------------------------------------------------ the class


def test_add_average_curve_and_bad_input():
    j = Journey()
    j.add(100, steps=3)
    j.add(40, steps=1)
    j.add(40, steps=2)
    assert j.average == pytest.approx((3 * 100 + 3 * 40) / 6)
    s = j.summary()
    assert s["initial_params"] == 100 and s["final_params"] == 40 and s["steps"] == 6
    assert s["curve"] == [[0, 100], [3, 40]]  # change points only
    with pytest.raises(ValueError):
        j.add(-1)
    thin = Journey(max_points=5)
    for k in range(50):
        thin.add(1000 - k)
    c = thin.curve()
    assert len(c) <= 5 and c[0] == (0, 1000) and c[-1] == (49, 951)


def test_live_parameters_masks_and_mapping():
    model = tiny()
    n = sum(p.numel() for p in model.parameters())
    m = {"0.weight": torch.rand(8, 16) > 0.3, "2.weight": torch.ones(4, 8, dtype=torch.bool)}
    gone = int((~m["0.weight"]).sum())
    assert live_parameters(model) == n
    assert live_parameters(model, m) == live_parameters(model, Masks(m)) == n - gone


def test_gradual_schedule_average_by_hand(monkeypatch):
    """Zhu & Gupta from step 2 to 6, every 2 steps, final 50%, 8 steps: masks at steps 2 (0%), 4, 6 (50%)."""
    model = tiny()
    n, p = 16 * 8 + 8 * 4 + 4, 16 * 8 + 8 * 4
    calls = []
    real = J.live_parameters
    monkeypatch.setattr(J, "live_parameters", lambda *a: calls.append(1) or real(*a))
    sched = Gradual(pruner("magnitude", "global"), final=0.5, start=2, end=6, every=2)
    j = Journey()
    opt = make_optimizer(model.parameters(), "sgd", 0.01)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 16, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(8)]
    train_loop(model, opt, [batches], lambda m, b: (nn.functional.cross_entropy(m(b[0]), b[1]), None),
               on_step=j.tracking(model, None, lambda step: sched.on_step(step, model)), progress=False)
    s4 = 0.5 * (1 - (1 - (4 - 2) / (6 - 2)) ** 3)  # the cubic ramp at step 4
    r4, r6 = removed(s4, p), removed(0.5, p)
    assert [e["step"] for e in sched.log] == [2, 4, 6] and r4 > 0
    assert j.summary()["curve"] == [[0, n], [4, n - r4], [6, n - r6]]
    assert j.average == pytest.approx((4 * n + 2 * (n - r4) + 2 * (n - r6)) / 8)
    assert j.steps == 8 and j.first == n and j.last == n - r6
    assert len(calls) == 1 + len(sched.log)  # counted once at the start and once per mask change, not per step


def test_dense_phase_average_is_the_parameter_count():
    data = load_data("synthetic", 96, 32, seed=0)
    model = SmallCNN(10, 2)
    cfg = make_config(model="cnn", dataset="synthetic", batch_size=32)
    j = Journey()
    train_epochs(model, data, 2, cfg, None, "dense", progress=False, journey=j)
    n = sum(p.numel() for p in model.parameters())
    assert j.steps == 2 * math.ceil(96 / 32)
    assert j.average == n and j.summary()["curve"] == [[0, n]]


# -------------------------------------------------------------------------------------- train-prune runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("journey")
    args = {"gradual": ["--schedule", "gradual", "--sparsity", "0.8", "--prune-every", "1",
                        "--gradual-start", "0.2", "--gradual-end", "0.7"],
            "lottery": ["--schedule", "lottery", "--sparsity", "0.75", "--rounds", "2", "--rewind-step", "1"],
            "oneshot": ["--schedule", "oneshot", "--sparsity", "0.6"]}
    out = {}
    for name, a in args.items():
        rc, stdout, err = invoke("train-prune", "cnn", "--out", tmp / name, *TINY, *a)
        assert rc == 0, err
        out[name] = (json.loads((tmp / name / io.MANIFEST).read_text()), stdout)
    return tmp, out


def _sizes(man):
    return man["summary"]["params"], sum(row["params"] for row in man["layers"])


def test_record_carries_the_journey_gradual(runs):
    _, out = runs
    man, stdout = out["gradual"]
    n, p = _sizes(man)
    j = man["summary"]["journey"]
    per_epoch = math.ceil(96 / 32)
    steps = 2 * per_epoch
    events = [(e["step"], e["sparsity"]) for e in man["gradual"]["steps"]]
    assert len(events) >= 2 and j["steps"] == steps
    expect = per_step_average(n, steps, events, p)
    assert j["average_params"] == pytest.approx(expect, abs=0.05)
    assert j["initial_params"] == n and j["final_params"] == n - round(events[-1][1] * p) == man["summary"]["nonzeros"]
    assert f"average parameters {expect:,.0f} over {steps} steps (final {j['final_params']:,})" in stdout


def test_record_carries_the_journey_lottery_and_oneshot(runs):
    _, out = runs
    per_epoch = math.ceil(96 / 32)
    man, _ = out["lottery"]
    n, p = _sizes(man)
    j = man["summary"]["journey"]
    rounds = [r["sparsity"] for r in man["rounds"]]
    assert len(rounds) == 2 and j["steps"] == 3 * per_epoch  # dense + each rewound round, every step counted
    assert j["average_params"] == pytest.approx(
        sum(n - round(s * p) for s in [0.0, *rounds]) * per_epoch / j["steps"], abs=0.05)
    assert [c[1] for c in j["curve"]] == [n - round(s * p) for s in [0.0, *rounds]]
    man, _ = out["oneshot"]
    n, p = _sizes(man)
    j = man["summary"]["journey"]
    sparse = n - round(man["summary"]["target_sparsity"] * p)
    assert j["curve"] == [[0, n], [per_epoch, sparse]]
    assert j["average_params"] == pytest.approx((n + sparse) / 2, abs=0.05)


def test_channel_run_counts_the_smaller_model(tmp_path):
    rc, _, err = invoke("train-prune", "cnn", "--out", tmp_path / "ch", *TINY, "--structure", "channels",
                        "--sparsity", "0.5", "--criterion", "l1")
    assert rc == 0, err
    man = json.loads((tmp_path / "ch" / io.MANIFEST).read_text())
    before, after = man["channels"]["params_before"], man["channels"]["params_after"]
    j = man["summary"]["journey"]
    assert after < before and j["curve"] == [[0, before], [3, after]]
    assert j["average_params"] == pytest.approx((before + after) / 2, abs=0.05)


# ------------------------------------------------------------------------------------------------ the report


def test_report_shows_average_parameters_and_the_curve(runs):
    tmp, out = runs
    llm = tmp / "llm-run"
    llm.mkdir()
    io.write_json(llm / io.MANIFEST, io.record(
        "llm", {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured"},
        metrics={"perplexity_dense": 10.0, "perplexity": 12.0, "agreement": 0.8},
        summary={"params": 1000, "nonzeros": 500, "target_sparsity": 0.5}))
    build_report([tmp / "gradual", tmp / "lottery", llm], tmp / "r.html")
    tree = Tree((tmp / "r.html").read_text(encoding="utf-8"))
    headers, rows, _ = runs_table(tree)
    assert "average parameters" in headers
    for name in ("gradual", "lottery"):
        j = out[name][0]["summary"]["journey"]
        assert rows[name]["average parameters"] == f"{round(j['average_params']):,}"
        assert rows[name]["method"] == f"magnitude ({name})"
    assert rows["llm-run"]["average parameters"] == ""
    ids = [f.attrs["id"] for f in tree.root.all("figure")]
    assert "plot-journey" in ids and len(images(tree)) == len(ids)
    commands = [p.text() for p in tree.root.all("pre", class_="command")]
    assert commands[0] == "prunekit train-prune --recipe recipe.yaml --out gradual-rerun"

    build_report([llm], tmp / "plain.html")  # no training-time run: neither the column nor the plot
    tree = Tree((tmp / "plain.html").read_text(encoding="utf-8"))
    headers, _, _ = runs_table(tree)
    assert "average parameters" not in headers
    assert "plot-journey" not in [f.attrs["id"] for f in tree.root.all("figure")]
