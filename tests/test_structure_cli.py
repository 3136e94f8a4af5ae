"""`prunekit prune --structure ...` as a user runs it: real subprocesses, exit codes, files."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from tests.conftest import byte_tokenizer
from tests.test_cli import run


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_heads_and_mlp_with_bias_compensation_give_a_stock_model(tiny_dir, tmp_path):
    d, text = tiny_dir
    out = tmp_path / "small"
    r = run("prune", str(d), "--structure", "heads,mlp", "--ratio", "0.5", "--criterion", "fluctuation",
            "--bias-compensation", "--calib", str(text), "--calib-samples", "8", "--seqlen", "64",
            "--eval-windows", "4", "--generations", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "a stock llama config: 2 heads, 2 kv heads, MLP width 64" in r.stdout
    assert "heads removed 4/8" in r.stdout and "MLP channels removed 128/256" in r.stdout and "perplexity" in r.stdout
    man = json.loads((out / "prunekit.json").read_text())
    assert man["summary"]["format"] == "stock" and man["recipe"]["structure"]["criterion"] == "fluctuation"
    m = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(d)
    assert m.config.attention_bias and m.config.mlp_bias and m.config.num_attention_heads == 2
    assert _params(m) == man["summary"]["params"] < _params(dense)
    assert m.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    # the stock output evaluates like any model
    r = run("eval", str(out), "--text", str(text), "--seqlen", "64", "--windows", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["perplexity"] == pytest.approx(man["metrics"]["perplexity"], rel=1e-4)


def test_removed_sublayer_gives_a_prunekit_model(tiny_dir, tmp_path):
    d, text = tiny_dir
    out = tmp_path / "sub"
    r = run("prune", str(d), "--remove-sublayers", "1", "--calib", str(text), "--calib-samples", "8",
            "--seqlen", "64", "--eval-text", "none", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "config.prunekit_layer_sizes" in r.stdout and f"prunekit.load('{out}')" in r.stdout
    model, _tok, man = prunekit.load(out)
    assert man["summary"]["format"] == "prunekit" and len(man["summary"]["removed_sublayers"]) == 1
    ids = torch.randint(0, 256, (2, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    with pytest.raises(ValueError, match="prunekit-llama"):
        AutoModelForCausalLM.from_pretrained(out)
    # a prunekit output can be pruned again (here: its MLPs)
    again = tmp_path / "again"
    r = run("prune", str(out), "--structure", "mlp", "--ratio", "0.25", "--criterion", "magnitude",
            "--eval-text", "none", "--out", str(again))
    assert r.returncode == 0, r.stderr
    sizes = [s["intermediate"] for s in prunekit.load(again)[0].config.prunekit_layer_sizes]
    assert sorted(sizes) == [0, 96] or sizes == [96, 96]


def test_recipe_structure_section_and_layer_removal(tiny_dir, tmp_path):
    d, text = tiny_dir
    rec = tmp_path / "r.yaml"
    rec.write_text(f"structure:\n  remove_layers: 1\ncalibration:\n  text: {text}\n  samples: 4\n  seqlen: 32\n")
    out = tmp_path / "o"
    r = run("prune", str(d), "--recipe", str(rec), "--eval-text", "none", "--out", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["structure"]["remove_layers"] == 1 and len(man["summary"]["removed_layers"]) == 1
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 1 and len(m.model.layers) == 1
    g = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert g.shape == (1, 7)
    # flags override the recipe's structure fields
    rec.write_text(f"structure: {{kinds: [mlp], ratio: 0.25, criterion: magnitude}}\ncalibration: {{text: {text}}}\n")
    r = run("prune", str(d), "--recipe", str(rec), "--ratio", "0.5", "--eval-text", "none", "--out", str(tmp_path / "o2"))
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "o2" / "prunekit.json").read_text())
    assert man["recipe"]["structure"]["sparsity"] == 0.5 and man["summary"]["mlp_removed"] == "128/256"


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--structure", "heads", "--ratio", "0.9"], "removes every attention head"),
        (["--structure", "mlp", "--ratio", "0.999"], "removes every MLP channel"),
        (["--structure", "heads", "--ratio", "0.1"], "grouped-query attention requires"),
        (["--structure", "heads", "--ratio", "0.2", "--gqa", "kv"], "removes no attention head"),
        (["--remove-layers", "2"], "not less than the model's 2 layers"),
        (["--remove-sublayers", "4"], "not less than the model's 4"),
        (["--structure", "rows", "--ratio", "0.3"], "structure.kinds"),
        (["--structure", "mlp"], "needs a sparsity"),
        (["--structure", "mlp", "--ratio", "0.3", "--method", "sparsegpt"], "replaces sparsity pruning"),
        (["--structure", "mlp", "--ratio", "0.3", "--criterion", "obs"], "Unknown structured criterion"),
        (["--remove-layers", "1", "--remove-sublayers", "1"], "not both"),
        (["--ratio", "0.3"], "sparsity needs kinds"),
        (["--structure", "mlp", "--ratio", "0.3", "--recover", "perp"], "not available after structured pruning"),
    ],
)
def test_bad_structured_input_exit_2_nothing_written(tiny_dir, tmp_path, args, phrase):
    d, text = tiny_dir
    out = tmp_path / "out"
    r = run("prune", str(d), "--calib", str(text), "--seqlen", "64", "--out", str(out), *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert phrase in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_architecture_without_structure_knowledge_exit_2(tmp_path):
    import transformers as t

    cfg = t.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=256)
    d = tmp_path / "neox"
    t.GPTNeoXForCausalLM(cfg).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    out = tmp_path / "out"
    r = run("prune", str(d), "--structure", "mlp", "--ratio", "0.5", "--criterion", "magnitude", "--eval-text", "none", "--out", str(out))
    assert r.returncode == 2 and "does not know where this model keeps its attention heads" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
