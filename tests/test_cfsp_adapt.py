"""CFSP (block ratios from angular distance, relative-importance fine score) and the Adapt-Pruner schedule."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.arch import adapter_for
from prunekit.recipe import Recipe
from prunekit.structure import layer_sizes, prune_structured
from prunekit.structure import cfsp as C
from prunekit.structure.similarity import block_distances, normalized_importance
from prunekit.train import distill as D
from tests.conftest import VOCAB, error_line, invoke, tiny_model


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(5))


def _hand_distances(model, ids):
    """arccos(cos(input, output)) / pi per token, averaged, from plain forward hooks and a plain forward."""
    blocks = adapter_for(model).blocks(model)
    got = [[] for _ in blocks]

    def hook(i):
        def h(_m, args, kwargs, out):
            x = (args[0] if args else kwargs["hidden_states"]).double().reshape(-1, 64)
            y = (out[0] if isinstance(out, tuple) else out).double().reshape(-1, 64)
            for a, b in zip(x, y):
                c = float(a @ b / (a.norm() * b.norm()))
                got[i].append(math.acos(max(-1.0, min(1.0, c))) / math.pi)
        return h

    hs = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    return [sum(v) / len(v) for v in got]


def test_block_distance_is_the_mean_token_angle_and_zero_for_an_identity_block(ids):
    m = tiny_model("llama", layers=3)
    with torch.no_grad():  # block 1 returns its input: no attention output, no MLP output
        m.model.layers[1].self_attn.o_proj.weight.zero_()
        m.model.layers[1].mlp.down_proj.weight.zero_()
    got = block_distances(adapter_for(m), m, ids, batch_size=3)
    want = _hand_distances(m, ids)
    assert got[1] == 0.0
    assert got[0] > 0.05 and got[2] > 0.05
    assert got == pytest.approx(want, abs=1e-5)
    imp = normalized_importance(got)
    assert max(abs(x) for x in imp) == pytest.approx(1.0) and sum(imp) == pytest.approx(0.0, abs=1e-12)
    assert imp[1] == min(imp)


def test_block_ratios_have_the_weighted_mean_and_order_inversely_to_importance():
    d = [0.5, 0.1, 0.2, 0.15, 0.3]
    w = [1.0, 2.0, 1.0, 1.0, 3.0]
    for s in (0.2, 0.5):
        r = C.block_ratios(d, s, w)
        assert sum(x * y for x, y in zip(r, w)) / sum(w) == pytest.approx(s, abs=1e-12)
        # less distance, more pruned
        assert sorted(range(5), key=lambda i: r[i]) == sorted(range(5), key=lambda i: -d[i])
        assert all(0.0 <= x <= 0.9 for x in r)
    # one dominant block hits the bound 0: every deviation shrinks by one factor, the mean stays
    r = C.block_ratios([5.0, 0.1, 0.12, 0.1], 0.3)
    assert r[0] == pytest.approx(0.0, abs=1e-12) and sum(r) / 4 == pytest.approx(0.3, abs=1e-12)
    g = [1 / (1 + math.exp(-(x - 1.33) / 1.33)) for x in (5.0, 0.1, 0.12, 0.1)]  # the map before the shrink
    assert (r[1] - 0.3) / (r[2] - 0.3) == pytest.approx((g[1] / sum(g) - 0.25) / (g[2] / sum(g) - 0.25), rel=1e-3)
    assert C.block_ratios([0.2, 0.2, 0.2], 0.4) == pytest.approx([0.4] * 3)


def test_fine_score_is_relative_importance_times_the_activation_norm():
    m = tiny_model("llama", layers=1)
    a = adapter_for(m)
    block = a.blocks(m)[0]
    g = torch.Generator().manual_seed(0)
    norms = {(0, "attn"): torch.rand(64, generator=g) + 0.5, (0, "mlp"): torch.rand(128, generator=g) + 0.5}
    s = C.fine_scores(a, m, norms)[0]
    gate, up, down = (block.mlp.gate_proj.weight.detach().double(), block.mlp.up_proj.weight.detach().double(),
                      block.mlp.down_proj.weight.detach().double())
    for j in (0, 7, 127):
        total = 0.0
        for i in range(64):  # down_proj column j: relative to row i (all channels) and to column j (the channel)
            total += abs(down[i, j]) / down[i].abs().sum() + abs(down[i, j]) / down[:, j].abs().sum()
        for w in (gate, up):  # the channel's row: relative to column k (all channels) and to the row itself
            for k in range(64):
                total += abs(w[j, k]) / w[:, k].abs().sum() + abs(w[j, k]) / w[j].abs().sum()
        assert float(s.mlp[j]) == pytest.approx(float(total) * float(norms[(0, "mlp")][j]), rel=1e-4)
    q, o = block.self_attn.q_proj.weight.detach().double(), block.self_attn.o_proj.weight.detach().double()
    head = 2  # head_dim 16: channels 32..47
    want = 0.0
    for c in range(32, 48):
        ri = sum(abs(o[i, c]) / o[i].abs().sum() + abs(o[i, c]) / o[:, c].abs().sum() for i in range(64))
        ri += sum(abs(q[c, k]) / q[:, k].abs().sum() + abs(q[c, k]) / q[c].abs().sum() for k in range(64))
        want += float(ri) * float(norms[(0, "attn")][c])
    assert float(s.heads[head]) == pytest.approx(want, rel=1e-4)
    assert torch.equal(s.kv, torch.zeros(2))


def test_cfsp_prunes_the_requested_total_with_per_block_ratios(ids):
    m = tiny_model("llama", layers=4)
    with torch.no_grad():
        for p in (m.model.layers[2].self_attn.o_proj.weight, m.model.layers[2].mlp.down_proj.weight):
            p.mul_(0.02)  # block 2 barely changes its input: the least important
    rec = Recipe.make(structure={"kinds": ["mlp"], "sparsity": 0.3, "criterion": "cfsp"})
    m, rep = prune_structured(m, rec, ids, progress=False)
    r = rep.summary["block_ratios"]
    assert sum(r) / 4 == pytest.approx(0.3, abs=1e-9) and r[2] == max(r)
    widths = [s["intermediate"] for s in layer_sizes(adapter_for(m), m)]
    assert sum(128 - w for w in widths) == round(0.3 * 512)  # as many channels as global ranking removes
    assert widths[2] == min(widths)
    assert rep.summary["params"] == rep.summary["params_expected"]


def test_adapt_pruner_reaches_the_exact_target_and_prunes_similar_blocks_more(ids, one_thread):
    st = {"kinds": ["heads", "mlp"], "sparsity": 0.3, "criterion": "magnitude"}
    one, _ = prune_structured(tiny_model("llama", layers=4), Recipe.make(structure=st), ids, progress=False)
    m = tiny_model("llama", layers=4)
    with torch.no_grad():
        for p in (m.model.layers[1].self_attn.o_proj.weight, m.model.layers[1].mlp.down_proj.weight):
            p.mul_(0.02)
    dense = sum(p.numel() for p in m.parameters())
    rec = Recipe.make(structure=st, distill={"steps": 4, "iterations": 4, "batch_size": 2, "lm_weight": 1.0,
                                             "schedule": "adapt-pruner", "adapt_amplitude": 0.1})
    m, rep = D.compress_and_distill(m, rec, ids, ids, progress=False)
    sizes, ref = layer_sizes(adapter_for(m), m), layer_sizes(adapter_for(one), one)
    assert sum(s["intermediate"] for s in sizes) == sum(s["intermediate"] for s in ref)
    assert sum(s["heads"] + s["kv_heads"] for s in sizes) == sum(s["heads"] + s["kv_heads"] for s in ref)
    widths = [s["intermediate"] for s in sizes]
    assert widths[1] < min(w for i, w in enumerate(widths) if i != 1)  # the near-identity block lost the most
    final = sum(p.numel() for p in m.parameters())
    j = rep.summary["journey"]
    assert j["initial_params"] == dense and j["final_params"] == final == rep.summary["params"] and j["steps"] == 4
    assert final < j["average_params"] < dense
    assert len(rep.summary["parts"]) == 4


@pytest.mark.parametrize("flags,words", [
    (["--criterion", "cfsp", "--global-rank"], "global_rank"),
    (["--structure", "hidden", "--criterion", "cfsp"], "hidden"),
    (["--distill", "4", "--schedule", "bogus"], "schedule"),
    (["--distill", "4", "--schedule", "adapt-pruner", "--global-rank"], "adapt-pruner"),
    (["--distill", "4", "--schedule", "adapt-pruner", "--adapt-amplitude", "2"], "adapt_amplitude"),
])
def test_cli_mistakes_exit_2(tiny_dir, tmp_path, flags, words):
    d, text = tiny_dir
    base = [] if "--structure" in flags else ["--structure", "mlp"]
    rc, _, err = invoke("prune", d, *base, "--sparsity", "0.3", "--calib", text, *flags, "--out", tmp_path / "o")
    assert rc == 2 and words in error_line(err) and not (tmp_path / "o").exists()


def test_adapt_pruner_is_in_the_prune_help():
    rc, out, _ = invoke("prune", "--help")
    assert rc == 0 and "--schedule" in out and "adapt-pruner" in out and "cfsp" in out


def test_cli_adapt_pruner_run_records_the_journey(tiny_dir, tmp_path, one_thread):
    import json

    d, text = tiny_dir
    (tmp_path / "r.yaml").write_text("distill: {batch_size: 2, samples: 8, seqlen: 32}\n")
    rc, out, err = invoke("prune", d, "--structure", "heads,mlp", "--sparsity", "0.3", "--criterion", "cfsp", "--calib",
                          text, "--calib-samples", "4", "--seqlen", "32", "--distill", "2", "--distill-iterations", "2",
                          "--schedule", "adapt-pruner", "--distill-text", text, "--ood-text", "none", "--recipe",
                          tmp_path / "r.yaml", "--out", tmp_path / "o")
    assert rc == 0, err
    assert "journey:" in out
    rec = json.loads((tmp_path / "o" / "prunekit.json").read_text())
    assert rec["recipe"]["distill"]["schedule"] == "adapt-pruner"
    j = rec["summary"]["journey"]
    assert j["steps"] == 2 and j["final_params"] < j["average_params"] < j["initial_params"]
