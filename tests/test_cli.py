"""The command line as a user runs it: real subprocesses, exit codes, files."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM


def run(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True, env=e)


def test_prune_then_eval(tiny_dir, tmp_path):
    d, text = tiny_dir
    out = tmp_path / "pruned"
    r = run("prune", str(d), "--method", "sparsegpt", "--pattern", "2:4", "--calib", str(text),
            "--calib-samples", "8", "--seqlen", "64", "--eval-windows", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "saved" in r.stdout and "agreement" in r.stdout
    man = json.loads((out / "prunekit.json").read_text())
    assert 0 < man["metrics"]["agreement"] < 1
    assert len(man["generations"]) == 3 and all(g["prompt"] and "dense" in g and "pruned" in g for g in man["generations"])
    assert man["source"] == str(d.resolve())
    assert man["recipe"]["method"] == "sparsegpt" and man["recipe"]["calibration"]["samples"] == 8
    assert man["metrics"]["perplexity"] > 1 and man["summary"]["target_sparsity"] == pytest.approx(0.5, abs=1e-6)
    m = AutoModelForCausalLM.from_pretrained(out)
    q = m.model.layers[0].self_attn.q_proj.weight
    assert ((q == 0).view(q.shape[0], -1, 4).sum(-1) == 2).all()

    r = run("eval", str(out), "--text", str(text), "--seqlen", "64", "--windows", "4", "--reference", str(d), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["agreement"] == pytest.approx(man["metrics"]["agreement"], abs=1e-6)
    assert res["perplexity"] == pytest.approx(man["metrics"]["perplexity"], rel=1e-4)
    assert res["recipe"]["pattern"] == "2:4"

    # a pruned directory can be pruned again (here: more sparsity by magnitude)
    r = run("prune", str(out), "--method", "magnitude", "--sparsity", "0.7", "--eval-text", "none", "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr


def test_recipe_file_and_flag_override(tiny_dir, tmp_path):
    d, text = tiny_dir
    rec = tmp_path / "r.yaml"
    rec.write_text(f"method: wanda\nsparsity: 0.6\ncalibration:\n  text: {text}\n  samples: 4\n  seqlen: 32\n")
    out = tmp_path / "o"
    r = run("prune", str(d), "--recipe", str(rec), "--sparsity", "0.4", "--eval-text", "none", "--out", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["method"] == "wanda" and man["recipe"]["sparsity"] == 0.4
    assert man["recipe"]["calibration"]["samples"] == 4


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["--method", "obs"], "Unknown method"),
        (["--pattern", "3:5"], "divisible by 5"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "means sparsity 0.5"),
        (["--calib-samples", "100000"], "tokens but"),
        (["--calib", "nosuchtext"], "Unknown text"),
        (["--exclude", "*"], "No layer is left"),
        (["--recipe", "missing.yaml"], "does not exist"),
        (["--allocation", "owl", "--pattern", "2:4"], "needs pattern 'unstructured'"),
        (["--allocation", "list", "--per-layer", "0.5,0.5,0.5"], "has 3 sparsities but the model has 2 layers"),
        (["--allocation", "global", "--min-density", "0.6"], "above the target density"),
        (["--allocation", "owl", "--owl-lambda", "0.7"], "lambda"),
        (["--calib-mode", "twice"], "calibration.mode"),
        (["--method", "gblm", "--gblm-alpha", "-1"], "gblm option alpha"),
        (["--method", "wanda", "--gblm-alpha", "1"], "option of method gblm"),
    ],
)
def test_bad_input_exit_2_nothing_written(tiny_dir, tmp_path, args, phrase):
    d, text = tiny_dir
    out = tmp_path / "out"
    base = ["prune", str(d), "--calib", str(text), "--seqlen", "64", "--out", str(out)]
    r = run(*base, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert phrase in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_model_and_existing_output(tiny_dir, tmp_path):
    d, text = tiny_dir
    r = run("prune", "no-such-model", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Unknown model" in r.stderr
    out = tmp_path / "exists"
    out.mkdir()
    r = run("prune", str(d), "--out", str(out), "--calib", str(text))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert list(out.iterdir()) == []
    r = run("eval", str(tmp_path))
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_model_without_blocks_is_a_clear_error():
    import prunekit

    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

    with pytest.raises(prunekit.PruneError, match="no decoder blocks"):
        prunekit.prune(NoBlocks(), {"method": "magnitude"})


def test_zoo_lists_assets():
    r = run("zoo")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "shakespeare" in r.stdout
    r = run("zoo", "--json")
    items = {a["name"]: a for a in json.loads(r.stdout)}
    # every family's bundled assets, with how each installs and whether it is here
    for name in ("smollm2-135m", "shakespeare", "pydoc", "efficientnet-lite0", "fashion-mnist", "digits", "minilm"):
        assert name in items and items[name]["install"] and isinstance(items[name]["available"], bool)
    assert {a["family"] for a in items.values()} == {"llm", "vision", "data", "tokens", "context", "diffusion"}
    assert items["pydoc"]["available"] and items["digits"]["available"]


def test_prune_with_recovery_section(tiny_dir, tmp_path):
    d, text = tiny_dir
    rec = tmp_path / "r.yaml"
    rec.write_text(
        f"method: wanda\nsparsity: 0.5\ncalibration: {{text: {text}, samples: 8, seqlen: 32}}\n"
        f"recovery: {{method: perp, steps: 15, lr: 0.005, text: {text}, samples: 16, seqlen: 32, batch_size: 4}}\n"
    )
    out = tmp_path / "o"
    r = run("prune", str(d), "--recipe", str(rec), "--eval-windows", "4", "--generations", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["recovery"]["steps"] == 15 and man["summary"]["recovery"]["steps"] == 15
    assert man["metrics"]["perplexity"] < man["metrics"]["perplexity_oneshot"]
    assert man["summary"]["target_sparsity"] == pytest.approx(0.5, abs=1e-6)
    m = AutoModelForCausalLM.from_pretrained(out)
    assert abs(float((m.model.layers[1].mlp.up_proj.weight == 0).float().mean()) - 0.5) < 1e-6
    r = run("prune", str(d), "--calib", str(text), "--recover", "perp", "--recover-steps", "0", "--out", str(tmp_path / "z"))
    assert r.returncode == 2 and "recovery.steps" in r.stderr and not (tmp_path / "z").exists()
