"""D-Pruner: domain Taylor importance plus the general text's OBS saliency (methods/dpruner.py)."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.arch import adapter_for, target_layers
from prunekit.core.masks import keep_highest
from prunekit.linear import weight_matrix
from prunekit.methods import get_method
from prunekit.recipe import Recipe
from tests.conftest import VOCAB, error_line, invoke, tiny_model


def _moments_by_hand(model, batches, name):
    """Mean gradient and mean squared gradient of one layer's weight, window by window with autograd."""
    mod = dict(model.named_modules())[name]
    gs = []
    for row in batches:
        model.zero_grad()
        ids = row.unsqueeze(0)
        model(input_ids=ids, labels=ids).loss.backward()
        gs.append(mod.weight.grad.detach().clone())
    model.zero_grad()
    g = torch.stack(gs)
    return g.mean(0), g.pow(2).mean(0)


def _saliency_by_hand(model, batches, name):
    """SparseGPT's OBS saliency W^2 / [H^-1]_jj, H the mean x x^T of the layer's inputs (+1% mean-diagonal damping)."""
    mod = dict(model.named_modules())[name]
    xs = []
    h = mod.register_forward_hook(lambda _m, inp, _out: xs.append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for row in batches:
            model(input_ids=row.unsqueeze(0))
    h.remove()
    x = torch.cat(xs).double()
    H = x.t() @ x / x.shape[0]
    H += 0.01 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    w = weight_matrix(mod).detach().double()
    return (w.pow(2) / torch.linalg.inv(H).diagonal().unsqueeze(0)).float()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (4, 16), generator=g), torch.randint(0, VOCAB, (4, 16), generator=g)


def test_lambda_zero_is_the_domain_gradient_only_importance(data):
    dom, gen = data
    model = tiny_model("llama")
    targets = [t for b in target_layers(model, adapter_for(model)) for t in b]
    m = get_method("d-pruner", {"lam": 0.0})
    m.prepare(model, dom, targets, False)  # no general windows needed at lambda 0
    name = "model.layers.1.mlp.down_proj"
    g, f = _moments_by_hand(model, dom, name)
    w = weight_matrix(dict(targets)[name]).detach()
    expect = (-g * w + 0.5 * f * w.pow(2)).abs()
    torch.testing.assert_close(m.scores_[name], expect, rtol=1e-4, atol=1e-12)
    # and the dual score adds lambda x the general OBS saliency, each normalised to mean 1 in its layer
    m2 = get_method("d-pruner", {"lam": 2.0})
    m2.general_batches = gen
    m2.prepare(model, dom, targets, False)
    G = _saliency_by_hand(model, gen, name)
    torch.testing.assert_close(m2.scores_[name], expect / expect.mean() + 2.0 * G / G.mean(), rtol=1e-4, atol=1e-6)


def test_large_lambda_keeps_the_general_saliency_ranking(data):
    dom, gen = data
    model = tiny_model("llama")
    targets = [t for b in target_layers(model, adapter_for(model)) for t in b]
    name = "model.layers.0.self_attn.q_proj"
    w = weight_matrix(dict(targets)[name]).detach().clone()
    G = _saliency_by_hand(model, gen, name)
    m = get_method("d-pruner", {"lam": 1e12, "group": "layer"})
    m.general_batches = gen
    m.prepare(model, dom, targets, False)
    keep = w.numel() // 2
    m.prune_group([weight_matrix(dict(targets)[name])], None, [w.numel() - keep], None, [name])
    kept = weight_matrix(dict(targets)[name]) != 0
    assert (kept == keep_highest(G, keep)).float().mean() > 0.99  # ties at float precision aside


def test_prune_draws_the_general_text_and_reaches_the_sparsity(tmp_path):
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama")
    tok = byte_tokenizer()
    rec = Recipe.make(method="d-pruner", sparsity=0.5, calibration={"text": "pydoc", "samples": 4, "seqlen": 16})
    _, rep = prunekit.prune(model, rec, tokenizer=tok, progress=False)
    assert rep.recipe["options"]["general_text"] == "shakespeare"  # the other bundled text, recorded
    for row in rep.layers.values():
        assert row["zeros"] == row["params"] // 2
    with pytest.raises(prunekit.PruneError, match="general text"):
        prunekit.prune(tiny_model("llama"), rec, torch.randint(0, VOCAB, (4, 16)), progress=False)


def test_cli_d_pruner_and_its_mistakes(tmp_path, tiny_dir):
    model, text = tiny_dir
    rc, out, err = invoke("prune", model, "--out", tmp_path / "o", "--method", "d-pruner", "--calib", text,
                          "--general-text", "pydoc", "--calib-samples", 4, "--seqlen", 16, "--eval-windows", 2, "--quiet")
    assert rc == 0, err
    rec = json.loads((tmp_path / "o" / "prunekit.json").read_text())
    assert rec["recipe"]["method"] == "d-pruner" and rec["recipe"]["options"]["general_text"] == "pydoc"
    rc, _, err = invoke("prune", model, "--out", tmp_path / "b", "--method", "wanda", "--dpruner-lambda", "1")
    assert rc == 2 and "--dpruner-lambda is an option of method d-pruner" in error_line(err)
    rc, _, err = invoke("prune", model, "--out", tmp_path / "c", "--method", "d-pruner", "--dpruner-lambda", "-1")
    assert rc == 2 and not (tmp_path / "c").exists()
    rc, _, err = invoke("prune", model, "--out", tmp_path / "d", "--method", "d-pruner", "--general-text", "nosuch")
    assert rc == 2 and "nosuch" in error_line(err) and not (tmp_path / "d").exists()


def test_d_pruner_with_distill_is_refused_in_one_sentence():
    with pytest.raises(prunekit.PruneError, match="d-pruner is not combined with a distill section"):
        Recipe.make(method="d-pruner", distill={"steps": 2})
