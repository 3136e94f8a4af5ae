"""Recovery (LoRA / PERP / distillation / full) of structurally pruned models: they train, keep their shapes and
save in the same format (stock or per-layer sizes)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import prunekit
from prunekit.errors import PruneError
from prunekit.evaluate import perplexity
from prunekit.structure import count_params, layer_sizes
from prunekit.arch import adapter_for
from tests.conftest import tiny_model
from tests.test_cli import run

FAST = {"steps": 30, "lr": 3e-3, "lora_rank": 4, "batch_size": 4, "seqlen": 32}


@pytest.fixture
def ids():
    return torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(2))


def _shrunk(ids, structure):
    dense = tiny_model("llama", layers=3)
    model, rep = prunekit.prune(copy.deepcopy(dense), {"structure": structure}, ids, progress=False)
    return dense, model, rep


@pytest.mark.parametrize("method", ["lora", "perp", "distill", "full"])
@pytest.mark.parametrize("structure", [
    {"kinds": ["heads", "mlp"], "ratio": 0.3, "global_rank": True, "bias_compensation": True},
    {"remove_sublayers": 2},
    {"kinds": ["hidden"], "ratio": 0.25},
])
def test_recovery_trains_a_shrunk_model_and_keeps_its_shapes(ids, method, structure):
    dense, model, rep = _shrunk(ids, structure)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sizes = layer_sizes(adapter_for(model), model)
    before = perplexity(model, ids)
    out, stats = prunekit.recover(model, {"method": method, **FAST}, ids, structured=True,
                                  teacher=dense if method == "distill" else None, progress=False)
    assert stats["loss_last"] < stats["loss_first"]
    assert perplexity(out, ids) < before
    assert {k: tuple(v.shape) for k, v in out.state_dict().items()} == shapes
    assert layer_sizes(adapter_for(out), out) == sizes and count_params(out) == rep.summary["params"]


def test_a_shrunk_model_without_the_flag_is_refused_as_unpruned(ids):
    _, model, _ = _shrunk(ids, {"kinds": ["mlp"], "ratio": 0.5})
    with pytest.raises(PruneError, match="no pruned weights"):
        prunekit.recover(model, {"method": "lora", **FAST}, ids, progress=False)


@pytest.mark.parametrize("flags, fmt", [
    (["--structure", "heads,mlp", "--ratio", "0.3", "--global-rank"], "prunekit"),
    (["--structure", "mlp", "--ratio", "0.5"], "stock"),
])
def test_cli_recover_a_structured_model(tiny_dir, tmp_path, flags, fmt):
    d, text = tiny_dir
    small = tmp_path / "small"
    r = run("prune", str(d), *flags, "--calib", str(text), "--calib-samples", "8", "--seqlen", "32",
            "--eval-windows", "2", "--generations", "0", "--out", str(small))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "rec"
    r = run("recover", str(small), "--method", "perp", "--steps", "20", "--lr", "3e-3", "--lora-rank", "4",
            "--text", str(text), "--samples", "16", "--seqlen", "32", "--batch-size", "4", "--eval-windows", "2",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["summary"]["format"] == fmt and man["recovery"]["stats"]["steps"] == 20
    assert man["recovery"]["metrics"]["perplexity_after"] < man["recovery"]["metrics"]["perplexity_before"]
    a, _, _ = prunekit.load(small)
    b, _, _ = prunekit.load(out)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)
