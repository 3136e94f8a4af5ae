"""Rate-distortion allocation (allocation rd): the dynamic program, the measured curves, the recipe path."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import prunekit
from prunekit.core.allocate import keep_counts, rd_sparsities
from prunekit.errors import PruneError
from prunekit.evaluate.sensitivity import output_distortion, sensitivity
from prunekit.recipe import Recipe
from tests.conftest import VOCAB, error_line, invoke, tiny_model


def _brute(curves, sizes, grid, sparsity):
    names = list(curves)
    best = None
    for combo in itertools.product(range(len(grid)), repeat=len(names)):
        removed = sum(sizes[n] * grid[c] for n, c in zip(names, combo))
        if removed + 1e-9 >= sparsity * sum(sizes.values()):
            d = sum(curves[n][c] for n, c in zip(names, combo))
            best = d if best is None else min(best, d)
    return best


def test_dynamic_program_matches_brute_force_on_3_layers_x_4_sparsities():
    rng = random.Random(0)
    grid = [0.0, 0.3, 0.6, 0.9]
    for trial in range(150):
        sizes = {"a": rng.choice([10, 20, 40]), "b": rng.choice([10, 30, 50]), "c": rng.choice([20, 60])}
        if trial % 2:
            curves = {k: sorted(rng.random() * 4 for _ in grid) for k in sizes}  # increasing, as measured
        else:
            curves = {k: [rng.random() for _ in grid] for k in sizes}  # any shape
        s = rng.choice([0.1, 0.25, 0.5, 0.75, 0.9])
        out = rd_sparsities(curves, sizes, grid, s, step=None)
        assert sum(sizes[k] * out[k] for k in sizes) + 1e-9 >= s * sum(sizes.values())  # the target is reached
        got = sum(curves[k][grid.index(out[k])] for k in sizes)
        assert got == pytest.approx(_brute(curves, sizes, grid, s), abs=1e-12)


def test_grid_given_in_any_order_and_interpolated():
    sizes = {"a": 100, "b": 100}
    # a is cheap to prune, b expensive: a takes as much as it can
    grid = [0.8, 0.4]
    curves = {"a": [0.8, 0.4], "b": [80.0, 40.0]}
    out = rd_sparsities(curves, sizes, grid, 0.4, step=0.01)
    assert out["a"] == pytest.approx(0.8) and out["b"] == pytest.approx(0.0)
    with pytest.raises(PruneError, match="goes up to sparsity 0.8"):
        rd_sparsities(curves, sizes, grid, 0.85)


def test_keep_counts_rd_is_exact_and_follows_the_curves():
    shapes = {f"l{i}": torch.zeros(64, 32) for i in range(4)}
    grid = [0.25, 0.5, 0.75]
    curves = {"l0": [0.1, 0.2, 0.3], "l1": [5.0, 10.0, 50.0], "l2": [0.2, 0.4, 0.8], "l3": [1.0, 2.0, 4.0]}
    kept = keep_counts(shapes, 0.5, "rd", rd_curves=curves, rd_grid=grid)
    total = sum(t.numel() for t in shapes.values())
    assert sum(kept.values()) == total // 2
    assert kept["l1"] > kept["l3"] > kept["l2"] >= kept["l0"]  # the costlier a layer's curve, the more it keeps
    with pytest.raises(PruneError, match="miss 1 group"):
        keep_counts(shapes, 0.5, "rd", rd_curves={k: v for k, v in curves.items() if k != "l3"}, rd_grid=grid)


def test_distortion_table_measures_the_logits_change():
    g = torch.Generator().manual_seed(3)
    cal = torch.randint(0, VOCAB, (6, 24), generator=g)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = sensitivity(model, Recipe(method="magnitude"), cal, cal[:2], [0.0, 0.5, 0.9], progress=False,
                    measure="distortion")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert t["measure"] == "distortion" and "perplexity_dense" not in t
    for row in t["units"].values():
        assert row["distortion"]["0"] == 0.0 and row["distortion"]["0.9"] > row["distortion"]["0.5"] > 0
    # block 0 by hand: its layers at 50% magnitude, logits MSE against the dense ones
    ref = output_distortion(model, cal[:2])
    from prunekit.arch import adapter_for, target_layers
    from prunekit.core.masks import kept_total, keep_highest
    from prunekit.linear import weight_matrix

    with torch.no_grad():
        for _, m in target_layers(model, adapter_for(model))[0]:
            w = weight_matrix(m)
            w.mul_(keep_highest(w.abs(), kept_total(w.numel(), 0.5)).to(w.dtype))
        by_hand = float((model(input_ids=cal[:2]).logits.float() - ref).pow(2).mean())
    assert t["units"]["model.layers.0"]["distortion"]["0.5"] == pytest.approx(by_hand, rel=1e-5)


def test_prune_with_rd_allocation_reaches_the_target_and_prefers_cheap_blocks():
    g = torch.Generator().manual_seed(4)
    cal = torch.randint(0, VOCAB, (6, 24), generator=g)
    model = tiny_model("llama", layers=3)
    rec = Recipe.make(method="wanda", sparsity=0.5, allocation={"kind": "rd", "rd_grid": [0.25, 0.5, 0.75], "rd_windows": 2})
    assert rec.needs_data
    table = sensitivity(tiny_model("llama", layers=3), rec, cal, cal[:2], [0.25, 0.5, 0.75], progress=False,
                        measure="distortion")
    _, rep = prunekit.prune(model, rec, cal, progress=False)
    params = sum(r["params"] for r in rep.layers.values())
    zeros = sum(r["zeros"] for r in rep.layers.values())
    assert zeros == params // 2
    bs = rep.summary["block_sparsity"]
    worst = max(table["units"], key=lambda k: table["units"][k]["distortion"]["0.75"])
    best = min(table["units"], key=lambda k: table["units"][k]["distortion"]["0.75"])
    i_worst, i_best = int(worst.rsplit(".", 1)[1]), int(best.rsplit(".", 1)[1])
    assert bs[i_worst] <= bs[i_best]


def test_rd_mistakes_are_one_sentence(tmp_path):
    with pytest.raises(PruneError, match="rd_grid"):
        Recipe.make(sparsity=0.95, allocation={"kind": "rd"})
    with pytest.raises(PruneError, match="rd_grid must be sparsities"):
        Recipe.make(allocation={"kind": "rd", "rd_grid": [0.5, 1.0]})
    rc, _, err = invoke("prune", "smollm2-135m-missing-dir-xyz", "--out", tmp_path / "o", "--allocation", "rd",
                        "--sparsity", "0.95")
    assert rc == 2 and "rd_grid" in error_line(err) and not (tmp_path / "o").exists()


def test_cli_distortion_table_then_rd_allocation(tmp_path, tiny_dir):
    import json

    model, text = tiny_dir
    rc, out, err = invoke("sensitivity", model, "--out", tmp_path / "t", "--measure", "distortion", "--grid", "0.3,0.6,0.9",
                          "--calib", text, "--calib-samples", 4, "--seqlen", 16, "--eval-windows", 2, "--quiet")
    assert rc == 0, err
    table = json.loads((tmp_path / "t" / "sensitivity.json").read_text())
    assert table["measure"] == "distortion" and table["windows"][0] == 2
    rc, out, err = invoke("prune", model, "--out", tmp_path / "p", "--allocation", "rd", "--sensitivity-table", tmp_path / "t",
                          "--sparsity", "0.5", "--calib", text, "--calib-samples", 4, "--seqlen", 16, "--eval-windows", 2, "--quiet")
    assert rc == 0, err
    rec = json.loads((tmp_path / "p" / "prunekit.json").read_text())
    assert rec["recipe"]["allocation"]["kind"] == "rd"
    # a perplexity table is not a distortion table
    rc, _, err = invoke("sensitivity", model, "--out", tmp_path / "s", "--grid", "0.5", "--calib", text, "--calib-samples", 4,
                        "--seqlen", 16, "--eval-windows", 2, "--quiet")
    assert rc == 0, err
    rc, _, err = invoke("prune", model, "--out", tmp_path / "q", "--allocation", "rd", "--sensitivity-table", tmp_path / "s",
                        "--calib", text, "--calib-samples", 4, "--seqlen", 16, "--eval-windows", 2, "--quiet")
    assert rc == 2 and "distortion" in error_line(err) and not (tmp_path / "q").exists()


def test_vision_rd_curves_and_masks():
    from prunekit.core.masks import keep_highest, kept_total, prunable
    from prunekit.vision import schedules as S
    from prunekit.vision.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(10, 4)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = prunable(model)
    scores = {k: p.detach().abs() for k, p in params.items()}
    curves = S.rd_curves(model, scores, [(x, y)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored, BN untouched
    name = next(iter(params))
    model.eval()
    with torch.no_grad():
        ref = model(x)
        p = params[name]
        p.mul_(keep_highest(scores[name], kept_total(p.numel(), 0.5)).float())
        by_hand = float((model(x) - ref).pow(2).mean())
    model.load_state_dict(before)
    assert curves[name][S.RD_GRID.index(0.5)] == pytest.approx(by_hand, rel=1e-5)
    m = S.compute_masks(model, 0.8, "magnitude", "rd", batches=[(x, y)])
    n = sum(p.numel() for p in params.values())
    assert m.kept() == round(0.2 * n)
    with pytest.raises(PruneError, match="inputs"):
        S.compute_masks(model, 0.8, "magnitude", "rd")
