import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.linear import weight_matrix
from tests.conftest import byte_tokenizer, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_save_reload_stock_transformers_same_logits(tmp_path, family, calib_ids):
    model = tiny_model(family)
    _, rep = prunekit.prune(model, {"method": "sparsegpt", "pattern": "2:4"}, calib_ids, progress=False)
    out = prunekit.save(model, byte_tokenizer(), tmp_path / "out", {"recipe": rep.recipe, "layers": rep.layers})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        a = model(input_ids=calib_ids[:4]).logits
        b = reloaded(input_ids=calib_ids[:4]).logits
    assert torch.equal(a, b)
    for (n, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal((p == 0), (q == 0)), n
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["pattern"] == "2:4" and "torch" in man["versions"]
    m2, tok2, man2 = prunekit.load(out)
    assert man2["recipe"]["method"] == "sparsegpt" and len(tok2) == 256
    assert torch.equal(weight_matrix(dict(m2.named_modules())[next(iter(rep.layers))]) == 0,
                       weight_matrix(dict(model.named_modules())[next(iter(rep.layers))]) == 0)


def test_save_refuses_existing_and_leaves_nothing_half_written(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(prunekit.PruneError, match="already exists"):
        prunekit.save(model, None, out)
    assert (out / "keep.txt").read_text() == "mine"

    class Boom(RuntimeError):
        pass

    def broken_save(*a, **k):
        raise Boom

    model.save_pretrained = broken_save
    with pytest.raises(Boom):
        prunekit.save(model, None, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir, no partial output
    with pytest.raises(prunekit.PruneError, match="did not write"):  # --overwrite replaces only prunekit outputs
        prunekit.save(tiny_model("llama"), None, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    prunekit.save(tiny_model("llama"), None, ours)
    (ours / "stale.txt").write_text("old")
    prunekit.save(tiny_model("llama"), None, ours, overwrite=True)
    assert not (ours / "stale.txt").exists() and (ours / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]
