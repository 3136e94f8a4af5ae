"""Sensitivity analysis: one unit pruned at a time over a grid, and the allocation it drives."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.errors import PruneError
from prunekit.evaluate.sensitivity import allocate_from_table, block_sparsities, sensitivity
from prunekit.recipe import Recipe
from tests.conftest import VOCAB, tiny_model


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (8, 32), generator=g), torch.randint(0, VOCAB, (4, 32), generator=g)


def test_sensitivity_table_is_zero_at_zero_and_restores_the_model(data):
    from prunekit.evaluate import perplexity

    cal, ev = data
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = sensitivity(model, Recipe(method="wanda"), cal, ev, [0.0, 0.5, 0.9], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # every unit restored
    dense = t["perplexity_dense"]
    assert dense == pytest.approx(float(perplexity(model, ev)))
    assert len(t["units"]) == len(model.model.layers)
    for row in t["units"].values():
        assert row["perplexity"]["0"] == dense  # pruned to 0%: exactly the dense model
        assert row["perplexity"]["0.9"] != dense
    # one unit measured by hand: block 1 pruned by wanda at 0.5 with the dense model's statistics
    m2 = tiny_model("llama")
    from prunekit.arch import adapter_for
    from prunekit.calibrate import run_sequential
    from prunekit.core.masks import kept_total
    from prunekit.arch import target_layers
    from prunekit.linear import weight_matrix
    from prunekit.methods import get_method

    ad = adapter_for(m2)
    per_block = target_layers(m2, ad)
    wanda, stats = get_method("wanda"), []
    run_sequential(m2, ad.blocks(m2), per_block, cal, "sqnorm", lambda bi, g, st: stats.append((bi, g, st.clone())),
                   progress=False, propagate=False)
    with torch.no_grad():
        for bi, g, st in stats:
            if bi == 1:
                ws = [weight_matrix(m) for _, m in g]
                wanda.prune_group(ws, st, [w.numel() - kept_total(w.numel(), 0.5) for w in ws], None, [n for n, _ in g])
    assert t["units"]["model.layers.1"]["perplexity"]["0.5"] == pytest.approx(float(perplexity(m2, ev)), rel=1e-6)


def test_layer_units_and_bad_grids(data):
    cal, ev = data
    model = tiny_model("llama")
    t = sensitivity(model, Recipe(method="magnitude"), None, ev, [0.5], unit="layer", progress=False)
    assert "model.layers.0.self_attn.q_proj" in t["units"] and len(t["units"]) == 7 * len(model.model.layers)
    for bad in ([1.0], [], [-0.1]):
        with pytest.raises(PruneError, match="grid"):
            sensitivity(model, Recipe(method="magnitude"), None, ev, bad, progress=False)


def test_allocation_from_a_table_is_cheapest_first_and_exact():
    table = {"grid": [0.25, 0.5, 0.75], "perplexity_dense": 10.0, "unit": "block", "units": {
        "m.0": {"params": 100, "perplexity": {"0.25": 10.1, "0.5": 10.2, "0.75": 10.3}},   # cheap
        "m.1": {"params": 300, "perplexity": {"0.25": 12.0, "0.5": 16.0, "0.75": 30.0}},   # dear
    }}
    s = allocate_from_table(table, 0.5)
    assert (100 * s["m.0"] + 300 * s["m.1"]) / 400 == pytest.approx(0.5)
    assert s["m.0"] == pytest.approx(0.75) and s["m.1"] == pytest.approx(0.5 * 400 / 300 - 0.75 / 3)
    b = allocate_from_table(table, 0.5, max_deviation=0.1)  # every unit within 0.1 of the target
    assert (100 * b["m.0"] + 300 * b["m.1"]) / 400 == pytest.approx(0.5)
    assert b["m.0"] == pytest.approx(0.6) and b["m.1"] == pytest.approx((200 - 60) / 300)
    with pytest.raises(PruneError, match="goes up to sparsity 0.75"):
        allocate_from_table(table, 0.8)
    with pytest.raises(PruneError, match="not this model's 3"):
        block_sparsities(table, 3, "m", 0.5)


def test_prune_with_a_sensitivity_allocation(data, tmp_path):
    cal, ev = data
    model = tiny_model("llama")
    t = sensitivity(model, Recipe(method="wanda"), cal, ev, [0.3, 0.6, 0.9], progress=False)
    (tmp_path / "sensitivity.json").write_text(json.dumps(t))
    want = block_sparsities(t, len(model.model.layers), "model.layers", 0.5)
    _, rep = prunekit.prune(model, {"method": "wanda", "sparsity": 0.5,
                                    "allocation": {"kind": "sensitivity", "table": str(tmp_path)}}, cal, progress=False)
    assert rep.summary["block_sparsity"] == pytest.approx(want, abs=0.01)
    assert rep.summary["target_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(set(round(x, 2) for x in want)) > 1  # the blocks differ
    with pytest.raises(PruneError, match="not a sensitivity table"):
        prunekit.prune(tiny_model("llama"), {"method": "wanda", "allocation": {"kind": "sensitivity",
                                                                                "table": str(tmp_path / "nope.json")}},
                       cal, progress=False)
    with pytest.raises(PruneError, match="needs table"):
        Recipe.make(allocation={"kind": "sensitivity"})


def test_cli_sensitivity_then_prune(tiny_dir, tmp_path):
    from tests.conftest import invoke

    d, text = tiny_dir
    out = tmp_path / "sens"
    common = ["--calib", text, "--calib-samples", "4", "--seqlen", "32"]
    rc, so, se = invoke("sensitivity", d, "--grid", "0.5,0.9", *common, "--eval-windows", "2", "--out", out)
    assert rc == 0, se
    t = json.loads((out / "sensitivity.json").read_text())
    assert set(t["grid"]) == {0.5, 0.9} and (out / "sensitivity.png").stat().st_size > 1000
    assert "model.layers.0" in so
    rc, so, se = invoke("prune", d, "--allocation", "sensitivity", "--sensitivity-table", out, "--sparsity", "0.5",
                        *common, "--eval-windows", "2", "--generations", "0", "--out", tmp_path / "p")
    assert rc == 0, se
    man = json.loads((tmp_path / "p" / "prunekit.json").read_text())
    assert man["recipe"]["allocation"] == {**man["recipe"]["allocation"], "kind": "sensitivity", "table": str(out)}
    rc, so, se = invoke("sensitivity", d, "--grid", "0.5,x", *common, "--out", tmp_path / "bad")
    assert rc == 2 and "--grid" in se and not (tmp_path / "bad").exists()
