"""Sparsity allocation across layers, GBLM and the one-pass mode."""

import pytest
import torch

import prunekit
from prunekit.core import allocate
from prunekit.core.masks import kept_total
from prunekit.arch import adapter_for, target_layers
from prunekit.linear import weight_matrix
from tests.conftest import tiny_model


def _flat(model):
    return [t for b in target_layers(model, adapter_for(model)) for t in b]


def _zeros(model):
    return {n: int((weight_matrix(m) == 0).sum()) for n, m in _flat(model)}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("kind", ["global", "owl"])
def test_allocation_hits_total_exactly(method, kind, calib_ids):
    m = tiny_model("llama", layers=3)
    alloc = {"kind": kind, **({"min_density": 0.3} if kind == "global" else {"owl_m": 2.0, "owl_lambda": 0.1})}
    _, rep = prunekit.prune(m, {"method": method, "sparsity": 0.6, "allocation": alloc}, calib_ids, progress=False)
    numel = {n: weight_matrix(mod).numel() for n, mod in _flat(m)}
    zeros = _zeros(m)
    assert sum(zeros.values()) == sum(numel.values()) - kept_total(sum(numel.values()), 0.6)
    if kind == "global":
        assert all(zeros[n] <= numel[n] - int(numel[n] * 0.3 + 0.999999) for n in numel)  # min density kept
        assert len({round(zeros[n] / numel[n], 3) for n in numel}) > 1  # not uniform
    else:
        bs = rep.summary["block_sparsity"]
        assert max(bs) - min(bs) == pytest.approx(0.2, abs=0.01)  # width 2 * lambda
        assert sum(bs) / len(bs) == pytest.approx(0.6, abs=1e-3)


def test_global_minimum_density_binds():
    # layer a holds all the small weights: a plain global threshold would empty it
    a, b = torch.full((10, 10), 0.01) + torch.rand(10, 10) * 1e-3, torch.rand(10, 10) + 1
    keep = allocate.keep_counts({"a": a, "b": b}, 0.5, "global")
    assert keep == {"a": 0, "b": 100}
    keep = allocate.keep_counts({"a": a, "b": b}, 0.5, "global", min_density=0.2)
    assert keep == {"a": 20, "b": 80}
    with pytest.raises(prunekit.PruneError, match="above the target density"):
        allocate.keep_counts({"a": a, "b": b}, 0.5, "global", min_density=0.6)


def test_owl_formula():
    quiet = torch.ones(100)
    loud = torch.ones(100)
    loud[:10] = 100.0  # 10% outliers
    s = allocate.owl_group_sparsity([quiet, loud, quiet], 0.5, m=5.0, lam=0.1)
    # ratios (0, 0.1, 0) -> rescaled (0, 0.2, 0) -> density shifted to mean 0.5
    assert s == pytest.approx([0.5 + 0.2 / 3, 0.5 - 0.4 / 3, 0.5 + 0.2 / 3])
    assert sum(s) / 3 == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.2)
    with pytest.raises(prunekit.PruneError, match="lambda"):
        allocate.owl_group_sparsity([quiet, loud], 0.5, 5.0, 0.6)
    with pytest.raises(prunekit.PruneError, match="lower lambda"):
        allocate.owl_group_sparsity([quiet, loud, quiet], 0.9, 5.0, 0.3)
    with pytest.raises(prunekit.PruneError, match="positive"):
        allocate.owl_group_sparsity([quiet, loud], 0.5, 0.0, 0.1)


def test_per_layer_list(calib_ids):
    m = tiny_model("llama", layers=2)
    prunekit.prune(m, {"method": "wanda", "allocation": {"kind": "list", "per_layer": [0.2, 0.7]}}, calib_ids, progress=False)
    for n, mod in _flat(m):
        w = weight_matrix(mod)
        expected = 0.2 if ".layers.0." in n else 0.7
        assert int((w == 0).sum()) == pytest.approx(w.numel() * expected, abs=w.shape[0])
    with pytest.raises(prunekit.PruneError, match="has 3 sparsities but the model has 2 layers"):
        prunekit.prune(tiny_model("llama"), {"method": "wanda", "allocation": {"kind": "list", "per_layer": [0.5] * 3}}, calib_ids, progress=False)


def test_gblm_alpha_zero_is_wanda(calib_ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    prunekit.prune(a, {"method": "wanda"}, calib_ids, progress=False)
    prunekit.prune(b, {"method": "gblm", "gblm_alpha": 0.0}, calib_ids, progress=False)
    for (n, x), (_, y) in zip(_flat(a), _flat(b)):
        assert torch.equal(weight_matrix(x) == 0, weight_matrix(y) == 0), n


def test_gblm_uses_gradients(calib_ids):
    from prunekit.methods.gblm import gradient_l2

    a, b = tiny_model("llama"), tiny_model("llama")
    prunekit.prune(a, {"method": "wanda"}, calib_ids, progress=False)
    prunekit.prune(b, {"method": "gblm", "gblm_alpha": 100.0, "pattern": "2:4"}, calib_ids, progress=False)
    w = weight_matrix(b.model.layers[0].mlp.down_proj)
    assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()
    c = tiny_model("llama")
    prunekit.prune(c, {"method": "gblm", "gblm_alpha": 100.0}, calib_ids, progress=False)
    differ = sum(int((weight_matrix(x) == 0).ne(weight_matrix(y) == 0).sum()) for (_, x), (_, y) in zip(_flat(a), _flat(c)))
    assert differ > 0
    # the gradient accumulator is the l2 norm over samples of per-sample gradients
    m = tiny_model("llama")
    flat = _flat(m)[:1]
    g2 = gradient_l2(m, calib_ids[:3], flat)
    assert all(p.grad is None and p.requires_grad for p in m.parameters())  # leaves no trace
    name, mod = flat[0]
    manual = torch.zeros_like(weight_matrix(mod))
    for row in calib_ids[:3]:
        m.zero_grad()
        m(input_ids=row[None], labels=row[None]).loss.backward()
        manual += mod.weight.grad.pow(2)
    assert torch.allclose(g2[name], manual.sqrt(), rtol=1e-4, atol=1e-7)


def test_one_pass_mode_uses_dense_statistics(calib_ids):
    seq, one = tiny_model("llama"), tiny_model("llama")
    _, r1 = prunekit.prune(seq, {"method": "sparsegpt"}, calib_ids, progress=False)
    _, r2 = prunekit.prune(one, {"method": "sparsegpt", "calibration": {"mode": "one-pass"}}, calib_ids, progress=False)
    assert r2.summary["target_sparsity"] == pytest.approx(r1.summary["target_sparsity"])
    # block 0 sees the same (dense) inputs in both modes; block 1 does not
    b0 = [(n, x, y) for (n, x), (_, y) in zip(_flat(seq), _flat(one)) if ".layers.0." in n]
    b1 = [(n, x, y) for (n, x), (_, y) in zip(_flat(seq), _flat(one)) if ".layers.1." in n]
    assert all(torch.allclose(weight_matrix(x), weight_matrix(y)) for _, x, y in b0)
    assert any(not torch.allclose(weight_matrix(x), weight_matrix(y)) for _, x, y in b1)
    assert r2.times["prune_forward_s"] > 0


def test_allocation_needs_unstructured():
    with pytest.raises(prunekit.PruneError, match="needs pattern 'unstructured'"):
        prunekit.Recipe.make(method="wanda", pattern="2:4", allocation={"kind": "owl"})


def test_agreement_and_generations():
    from prunekit import api
    from prunekit.evaluate import agreement, score_windows
    from tests.conftest import byte_tokenizer

    tok = byte_tokenizer()
    g = torch.Generator().manual_seed(5)
    windows = torch.randint(0, 256, (4, 24), generator=g)
    dense = tiny_model("llama")
    ref = api.reference(dense, tok, windows, generations=2, new_tokens=5)
    assert len(ref["texts"]) == 2
    same, gens = api.compare(dense, tok, windows, ref)
    assert same["agreement"] == 1.0 and same["perplexity"] == pytest.approx(ref["perplexity"])
    assert [x["dense"] for x in gens] == [x["pruned"] for x in gens]
    prunekit.prune(dense, {"method": "magnitude", "sparsity": 0.9}, progress=False)
    worse, gens = api.compare(dense, tok, windows, ref)
    assert worse["agreement"] < 1.0 and worse["perplexity"] != ref["perplexity"]
    p = score_windows(dense, windows)[1]
    assert agreement(p, p) == 1.0 and agreement(p, (p + 1) % 256) == 0.0
