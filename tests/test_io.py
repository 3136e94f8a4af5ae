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


def test_load_opens_any_run(tmp_path):
    """prunekit.load opens an LLM output, a vision run and a data file."""
    import numpy as np

    from prunekit.data import load_dataset, save_scores
    from prunekit.data.scores import ScoreResult
    from prunekit.vision.train import make_config, save_run, train_prune

    from tests.conftest import byte_tokenizer

    llm = prunekit.save(tiny_model("llama"), byte_tokenizer(), tmp_path / "llm", {"recipe": {"method": "wanda"}})
    run = prunekit.load(llm)
    assert run.kind == "llm" and run.manifest["recipe"]["method"] == "wanda"
    model, _tok, man = run  # the tuple of before
    assert model is run.model and run[0] is run.model and run[2] is run.manifest and len(run) == 3
    cfg = make_config(model="cnn", dataset="synthetic", epochs=1, finetune_epochs=0, sparsity=0.5, batch_size=64)
    m, masks, info = train_prune(cfg, progress=False)
    save_run(tmp_path / "vis", m, cfg, masks, info)
    v = prunekit.load(tmp_path / "vis")
    assert v.kind == "vision" and v.masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    ds = load_dataset("digits")
    save_scores(tmp_path / "s.parquet", ds, ScoreResult("random", np.arange(len(ds), dtype=float)))
    d = prunekit.load(tmp_path / "s.parquet")
    assert d.kind == "data-score" and len(d.columns["score"]) == len(ds)


SCHEMA_KEYS = {"schema", "kind", "recipe", "versions", "metrics", "timings", "layers"}


def test_every_run_writes_one_schema(tmp_path):
    """LLM model dirs, vision runs, data score/subset files and data-train metrics share one record."""
    import numpy as np

    from prunekit.data import load_dataset, save_keep, save_scores
    from prunekit.data.scores import ScoreResult
    from prunekit.report import Report
    from prunekit.vision.train import make_config, save_run, train_prune

    from tests.conftest import byte_tokenizer

    model = tiny_model("llama")
    rep = Report(recipe={"method": "magnitude"}, layers={"model.layers.0.mlp.up_proj": {"params": 4, "zeros": 2}},
                 times={"prune_s": 1.5}, metrics={"perplexity": 3.0})
    llm = prunekit.load(prunekit.save(model, byte_tokenizer(), tmp_path / "llm", rep.to_dict())).manifest
    cfg = make_config(model="cnn", dataset="synthetic", epochs=1, finetune_epochs=0, sparsity=0.5, batch_size=64)
    m, masks, info = train_prune(cfg, progress=False)
    vis = prunekit.load(save_run(tmp_path / "vis", m, cfg, masks, info)).manifest
    ds = load_dataset("digits")
    save_scores(tmp_path / "s.parquet", ds, ScoreResult("random", np.arange(len(ds), dtype=float)), seconds=0.5)
    score = prunekit.load(tmp_path / "s.parquet").manifest
    save_keep(tmp_path / "k.parquet", np.arange(10), len(ds), {"dataset": "digits"}, recipe={"strategy": "random"})
    subset = prunekit.load(tmp_path / "k.parquet").manifest
    for rec, kind in ((llm, "llm"), (vis, "vision"), (score, "data-score"), (subset, "data-subset")):
        assert SCHEMA_KEYS <= set(rec) and rec["schema"] == 1 and rec["kind"] == kind, (kind, sorted(rec))
        assert rec["versions"]["prunekit"] == prunekit.__version__ and "torch" in rec["versions"]
    assert llm["layers"] == [{"name": "model.layers.0.mlp.up_proj", "params": 4, "zeros": 2}]
    assert llm["timings"] == {"prune_s": 1.5} and llm["metrics"] == {"perplexity": 3.0} and "times" not in llm
    assert vis["timings"]["train_prune_s"] > 0 and vis["metrics"]["test_acc"] == info["metrics"]["test_acc"]
    assert {r["name"] for r in vis["layers"]} == set(masks)
    zeros = sum(r["zeros"] for r in vis["layers"]) / sum(r["params"] for r in vis["layers"])
    assert zeros == pytest.approx(masks.sparsity())
    assert score["recipe"]["score"] == "random" and score["timings"]["seconds"] == 0.5
    assert subset["recipe"] == {"strategy": "random"} and subset["metrics"]["kept"] == 10
