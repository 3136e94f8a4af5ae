"""Learner ``rps`` (random parameter sharing, ROAST / STABLE-RPS): the full-budget identity mapping reproduces a
dense model's weights, the gradient of the shared array is the signed sum of the mapped weight gradients, the
hash is seeded and chunked, a train-prune run trains only the budget and loads back, and option mistakes are one
sentence with exit 2."""

from __future__ import annotations

import copy
import json

import torch

from prunekit.core.masks import prunable
from prunekit.vision.learn.rps import attach, layer_map
from prunekit.vision.models import SmallCNN, TinyViT
from prunekit.vision.train import load_data, load_run, make_config, save_run, train_prune

torch.set_num_threads(1)


def _layers(model):
    params = prunable(model)
    return list(params), [p.detach().clone() for p in params.values()]


def test_full_budget_identity_reproduces_any_dense_model():
    for model in (SmallCNN(10, 8).eval(), TinyViT(10, 32).eval()):
        x = torch.randn(3, 1, 28, 28)
        with torch.no_grad():
            before = model(x)
        names, weights = _layers(model)
        total = sum(w.numel() for w in weights)
        params_before = sum(p.numel() for p in model.parameters())
        shared = attach(model, names, total, "identity", scales=[1.0] * len(names))
        shared.fit(weights)
        mods = dict(model.named_modules())
        for k, (n, w) in enumerate(zip(names, weights)):  # exactly the dense weights, drawn from z
            m, a = n.rsplit(".", 1)
            assert torch.equal(shared.draw(k), w) and getattr(mods[m], a) is None
        with torch.no_grad():
            assert torch.equal(model(x), before)
        assert list(prunable(model)) == ["rps.weight"]  # the one trained weight tensor
        assert sum(p.numel() for p in model.parameters()) == params_before  # z replaces the weights one for one
    # with ROAST's per-layer scales (z of unit scale) the fit is exact up to rounding
    model = SmallCNN(10, 8).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    names, weights = _layers(model)
    attach(model, names, sum(w.numel() for w in weights), "identity").fit(weights)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)


def test_gradient_of_z_is_the_signed_sum_of_mapped_weight_gradients():
    """dL/dz[j] = sum over the weights i mapped to j of s_i g dL/dw_i (STABLE-RPS scaling: s_i dL/dw_i / g); with
    unit scales both are the plain signed sum."""
    torch.manual_seed(0)
    for grad_scale, scales in ((True, None), (False, None), (True, 1.0), (False, 1.0)):
        model = SmallCNN(10, 4).train()
        names, weights = _layers(model)
        total = sum(w.numel() for w in weights)
        shared = attach(model, names, total // 7, "hash", chunk=5, seed=3, grad_scale=grad_scale,
                        scales=None if scales is None else [scales] * len(names))
        with torch.no_grad():
            shared.z.normal_()
        drawn = {}

        def keep(m, args, n):  # a pre-hook registered after the draw: the drawn weight, its gradient retained
            m.weight.retain_grad()
            drawn[n] = m.weight

        hooks = [dict(model.named_modules())[n.rsplit(".", 1)[0]].register_forward_pre_hook(
            lambda m, a, n=n: keep(m, a, n)) for n in names]
        x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for h in hooks:
            h.remove()
        expect = torch.zeros(total // 7)
        for k, n in enumerate(names):
            g = 1 / float(shared.scale[k]) if grad_scale else float(shared.scale[k])
            expect.index_add_(0, getattr(shared, f"idx{k}"),
                              g * getattr(shared, f"sign{k}") * drawn[n].grad.reshape(-1))
            # the drawn weight is g_k * s * z[h]
            torch.testing.assert_close(drawn[n].detach().reshape(-1), shared.scale[k] * getattr(shared, f"sign{k}")
                                       * shared.z.detach()[getattr(shared, f"idx{k}")])
        torch.testing.assert_close(shared.weight.grad.view(-1), expect, rtol=1e-4, atol=1e-6)


def test_hash_is_seeded_chunked_and_in_range():
    idx, sign = layer_map(100, 37, seed=5, layer=2, chunk=8)
    idx2, sign2 = layer_map(100, 37, seed=5, layer=2, chunk=8)
    assert torch.equal(idx, idx2) and torch.equal(sign, sign2)
    assert not torch.equal(idx, layer_map(100, 37, seed=5, layer=3, chunk=8)[0])
    assert int(idx.min()) >= 0 and int(idx.max()) < 37 and set(sign.tolist()) == {-1.0, 1.0}
    chunks = idx[:96].view(12, 8)  # each chunk reads consecutive entries of z
    assert torch.equal(chunks - chunks[:, :1], torch.arange(8).expand(12, 8))


def test_deepcopy_draws_from_its_own_array():
    model = SmallCNN(10, 4).eval()
    names, weights = _layers(model)
    attach(model, names, 500, "hash", seed=1).fit(weights)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = twin(x)
        model.rps.weight.zero_()
        assert torch.equal(twin(x), before)


def test_learner_trains_the_budget_and_the_run_loads_back(tmp_path):
    data = load_data("synthetic", 256, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=1, finetune_epochs=1, batch_size=64, learn="rps",
                      sparsity=0.9, options={"chunk": 16})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    L = info["learn"]
    dense_weights = sum(p.numel() for p in prunable(SmallCNN(10, 32)).values())
    assert masks is None and L["shared_weights"] == dense_weights and L["budget"] == round(0.1 * dense_weights)
    assert L["params_after"] == L["params_before"] - dense_weights + L["budget"] == info["metrics"]["params"]
    assert info["journey"]["steps"] == 2 * 4 and info["journey"]["final_params"] == L["params_after"]
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, _, manifest = load_run(tmp_path / "run")
    assert manifest["learn"]["budget"] == L["budget"]
    x = data["x_test"][:8]
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x), rtol=0, atol=0)


def test_cli_runs_and_mistakes_exit_2(tmp_path):
    from tests.conftest import error_line, invoke

    args = ["train-prune", "cnn", "--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "0",
            "--train-subset", "128", "--test-subset", "32", "--batch-size", "64", "--learn", "rps", "--quiet"]
    rc, out, err = invoke(*args, "--sparsity", "0.95", "--option", "chunk=1", "--out", tmp_path / "r")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "r" / "prunekit.json").read_text())
    assert manifest["shapes"]["rps.weight"] == [1, manifest["learn"]["budget"]]
    assert "features.0.weight" not in manifest["shapes"] and manifest["learn"]["chunk"] == 1
    model, _, _ = load_run(tmp_path / "r")
    assert sum(p.numel() for p in model.parameters()) == manifest["learn"]["params_after"]
    for bad, word in [("chunk=0", "chunk must be at least 1"), ("mapping=modulo", "mapping"),
                      ("init=zeros", "init"), ("mapping=identity", "needs sparsity 0")]:
        rc, _, err = invoke(*args, "--sparsity", "0.5", "--option", bad, "--out", tmp_path / "bad")
        assert rc == 2 and word in error_line(err) and not (tmp_path / "bad").exists(), err
