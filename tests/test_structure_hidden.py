"""Hidden-size (residual stream) pruning: exact (equals zeroing the channels), stock-loadable, plan-exact."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.arch import adapter_for
from prunekit.errors import PruneError
from prunekit.structure import count_params
from prunekit.structure import hidden as hid
from tests.conftest import byte_tokenizer, tiny_model

ATOL = 1e-4
LLAMA_LIKE = ("llama", "qwen2", "mistral")


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def zero_channels(model, gone):
    """The reference: the removed channels are zero in the embedding and in everything that writes the stream."""
    a = adapter_for(model)
    p = hid.parts(a, model)
    gone = torch.as_tensor(gone)
    p["embed"][0].weight[:, gone] = 0
    for m in p["writers"]:
        m.weight[gone, :] = 0
        if m.bias is not None:
            m.bias[gone] = 0


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_removing_hidden_channels_equals_zeroing_them(family, ids):
    model = tiny_model(family, layers=3)
    d = model.config.hidden_size
    gone = list(range(0, d, 4))  # a quarter, spread over the width
    ref = copy.deepcopy(model)
    zero_channels(ref, gone)
    hid.shrink_hidden(adapter_for(model), model, [c for c in range(d) if c not in set(gone)])
    assert model.config.hidden_size == d - len(gone)
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=ATOL, rtol=1e-4)


def test_without_the_norm_correction_it_would_not_be_exact(ids):
    """Guards the RMSNorm correction: undo it and the outputs move (so the equivalence test above has teeth)."""
    model = tiny_model("llama", layers=2)
    d = model.config.hidden_size
    keep = list(range(d // 2))
    ref = copy.deepcopy(model)
    zero_channels(ref, list(range(d // 2, d)))
    hid.shrink_hidden(adapter_for(model), model, keep)
    with torch.no_grad():
        for m in hid.parts(adapter_for(model), model)["norms"]:
            m.weight.div_(2 ** 0.5)
    assert not torch.allclose(logits(model, ids), logits(ref, ids), atol=1e-2)


@pytest.mark.parametrize("criterion", ["magnitude", "magnitude-l1", "fluctuation", "taylor", "random"])
def test_hidden_pruning_every_criterion_saves_stock(criterion, tmp_path, calib_ids, ids):
    model = tiny_model("llama", layers=2)
    before = count_params(model)
    model, rep = prunekit.prune(model, {"structure": {"kinds": ["hidden"], "ratio": 0.25, "criterion": criterion}},
                                calib_ids, progress=False)
    assert model.config.hidden_size == 48 and rep.summary["hidden_removed"] == "16/64"
    assert rep.summary["params"] == rep.summary["params_expected"] < before
    assert rep.summary["format"] == "stock"
    out = prunekit.save(model, byte_tokenizer(), tmp_path / "m", rep.to_dict())
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert stock.config.hidden_size == 48 and stock.config.head_dim == 16
    assert torch.allclose(logits(stock, ids), logits(model, ids), atol=1e-5)


def test_magnitude_keeps_the_strongest_channels(calib_ids):
    model = tiny_model("llama", layers=2)
    with torch.no_grad():  # channel 7 is huge everywhere, channel 9 is tiny everywhere
        for t, axis in hid._weight_slices(hid.parts(adapter_for(model), model)):
            idx = [slice(None)] * t.dim()
            idx[axis if t.dim() > 1 else 0] = 7
            t[tuple(idx)] *= 50
            idx[axis if t.dim() > 1 else 0] = 9
            t[tuple(idx)] *= 0.001
    s = hid.scores(adapter_for(model), model, "magnitude", None)
    assert int(s.argmax()) == 7 and int(s.argmin()) == 9


def test_activation_scores_match_a_direct_computation(calib_ids):
    model = tiny_model("llama", layers=2)
    a = adapter_for(model)
    norms = hid.parts(a, model)["norms"]
    outs = []
    hs = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach())) for m in norms]
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    for h in hs:
        h.remove()
    want = sum(o.reshape(-1, o.shape[-1]).pow(2).mean(0).sqrt() for o in outs)
    got = hid.scores(a, model, "fluctuation", calib_ids, batch_size=4)
    assert torch.allclose(got, want, rtol=1e-4)


def test_hidden_with_heads_and_mlp_gqa(calib_ids, ids, tmp_path):
    model = tiny_model("llama", layers=3)
    model, rep = prunekit.prune(model, {"structure": {"kinds": ["heads", "mlp", "hidden"], "ratio": 0.5}}, calib_ids,
                                progress=False)
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64
    assert rep.summary["params"] == rep.summary["params_expected"]
    out = prunekit.save(model, byte_tokenizer(), tmp_path / "m", rep.to_dict())
    again, _, _ = prunekit.load(out)
    assert torch.allclose(logits(again, ids), logits(model, ids), atol=1e-5)


def test_hidden_after_removed_sublayers(calib_ids, ids, tmp_path):
    model = tiny_model("llama", layers=3)
    model, rep = prunekit.prune(model, {"structure": {"remove_sublayers": 2}}, calib_ids, progress=False)
    ref = copy.deepcopy(model)
    d = model.config.hidden_size
    zero_channels(ref, [0, 1, 2, 3])
    hid.shrink_hidden(adapter_for(model), model, range(4, d))
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_families_without_explicit_head_dim_are_refused(family, calib_ids):
    model = tiny_model(family)
    with pytest.raises(PruneError, match="Hidden-size pruning supports"):
        prunekit.prune(model, {"structure": {"kinds": ["hidden"], "ratio": 0.25}}, calib_ids, progress=False)


def test_cli_hidden_refusal_is_exit_2(tmp_path):
    from tests.test_cli import run

    d = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    r = run("prune", str(d), "--structure", "hidden", "--ratio", "0.25", "--criterion", "magnitude", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Hidden-size pruning supports" in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_hidden_gives_a_stock_model(tiny_dir, tmp_path):
    from tests.test_cli import run

    d, text = tiny_dir
    out = tmp_path / "narrow"
    r = run("prune", str(d), "--structure", "hidden", "--ratio", "0.25", "--criterion", "fluctuation", "--calib", str(text),
            "--calib-samples", "8", "--seqlen", "32", "--eval-windows", "2", "--generations", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "hidden channels removed 16/64" in r.stdout and "hidden size 48" in r.stdout
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.model.embed_tokens.weight.shape == (256, 48) and m.config.head_dim == 16
