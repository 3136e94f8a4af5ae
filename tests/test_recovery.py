"""Recovery after pruning: training that keeps every pruned weight at exactly zero (prunekit.train)."""

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import prunekit
from prunekit.arch import adapter_for, target_layers
from prunekit.evaluate import perplexity
from prunekit.train import recover
from prunekit.train.recovery import _attach_lora, _mask_adapters, pruning_masks
from tests.conftest import byte_tokenizer, tiny_model

METHODS = ("perp", "lora", "full", "distill")
FAST = {"steps": 30, "lr": 3e-3, "batch_size": 4, "lora_rank": 4}
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes them 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ids():
    """A fixed, learnable token set: 16 windows of 32 bytes of the Python reference manual."""
    import pydoc_data.topics as t

    text = "\n".join(list(t.topics.values())[:20])
    tokens = prunekit.tokenize(byte_tokenizer(), text)
    return tokens[: 16 * 32].view(16, 32).clone()


def _pruned(ids, seed=0):
    dense = tiny_model("llama", seed=seed)
    model = copy.deepcopy(dense)
    prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, ids, progress=False)
    return dense, model


def _block_weights(model):
    return {n: m.weight.detach().clone() for b in target_layers(model, adapter_for(model)) for n, m in b}


def _no_peft(model):
    assert type(model) is LlamaForCausalLM
    assert not hasattr(model, "peft_config")
    assert not [type(m).__module__ for m in model.modules() if type(m).__module__.startswith("peft")]
    assert not [n for n, _ in model.named_parameters() if "lora_" in n or "base_layer" in n]


@pytest.mark.parametrize("method", METHODS)
def test_recover_keeps_mask_and_lowers_perplexity(ids, method):
    dense, model = _pruned(ids)
    before = _block_weights(model)
    masks = {n: w == 0 for n, w in before.items()}
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    ppl_before = perplexity(model, ids)
    out, stats = recover(model, {"method": method, **FAST}, ids, teacher=dense if method == "distill" else None, progress=False)

    assert out is model
    _no_peft(model)
    after = _block_weights(model)
    for n, w in after.items():
        assert torch.equal(w == 0, masks[n]), f"{n}: the zeros moved"  # same mask, pruned weights exactly zero
        assert not torch.equal(w, before[n]), f"{n}: the kept weights did not train (LoRA not merged?)"
    ppl_after = perplexity(model, ids)
    assert ppl_after < 0.8 * ppl_before, (ppl_before, ppl_after)
    assert set(stats) == {"steps", "loss_first", "loss_last", "seconds", "trainable_params", "selection"}
    assert stats["steps"] == 30 and stats["loss_last"] < stats["loss_first"]
    assert not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    changed_norms = [n for n, p in model.named_parameters() if n in norms and not torch.equal(p, norms[n])]
    if method == "lora":
        assert changed_norms == [] and stats["trainable_params"] == sum(4 * sum(w.shape) for w in before.values())
    else:
        assert changed_norms, "norm weights were not trained"
    if method == "distill":
        assert not dense.training and all(p.grad is None for p in dense.parameters())


def test_masked_lora_merges_into_exactly_the_trained_model(ids):
    """The adapters train W + mask * delta, so merging and re-masking gives the same function."""
    _, model = _pruned(ids)
    masks = pruning_masks(model)
    rec = prunekit.recipe.Recovery(lora_rank=4)
    peft_model = _attach_lora(model, masks, rec)
    params = _mask_adapters(model, masks)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)  # lora_B starts at zero: give both factors values
        trained = model(input_ids=ids[:4]).logits
    peft_model.merge_and_unload()
    with torch.no_grad():
        masks.masks.apply(model)
        merged = model(input_ids=ids[:4]).logits
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)


def test_full_rezeroes_after_every_step(ids):
    _, model = _pruned(ids)
    q = model.model.layers[0].self_attn.q_proj
    mask = q.weight.detach() == 0
    seen, grads, moments = [], [], []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(bool((m.weight[mask] == 0).all())))
    # no gradient reaches a pruned weight, so AdamW keeps no moment for it
    pre = register_optimizer_step_pre_hook(
        lambda opt, a, k: grads.append(bool((q.weight.grad[mask] == 0).all()))
    )
    post = register_optimizer_step_post_hook(
        lambda opt, a, k: moments.append(bool((opt.state[q.weight]["exp_avg"][mask] == 0).all()))
    )
    try:
        recover(model, {"method": "full", **FAST}, ids, progress=False)
    finally:
        h.remove(), pre.remove(), post.remove()
    assert len(seen) == len(grads) == len(moments) == 30
    assert all(seen) and all(grads) and all(moments)


@pytest.mark.parametrize("method", ["perp", "full"])
def test_interrupt_propagates_and_restores_the_model(ids, method):
    _, model = _pruned(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.norm.weight.requires_grad_(False)  # a caller's flag must survive
    calls = []

    def boom(_m, _a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    h = model.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        recover(model, {"method": method, **FAST}, ids, progress=False)
    h.remove()
    _no_peft(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.model.norm.weight.requires_grad and model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert not model.training


@pytest.mark.parametrize(
    "fields, phrase",
    [
        ({"steps": 0}, "Invalid recovery steps: must be a positive integer, got 0"),
        ({"lr": 0}, "Invalid recovery lr: must be positive"),
        ({"lora_rank": 0}, "Invalid recovery lora_rank"),
        ({"distill_weight": 1.5}, "Invalid recovery distill_weight"),
        ({"method": "sgd"}, "Unknown recovery method 'sgd'"),
        ({"rank": 4}, "Unknown recovery field 'rank'"),
        ({"lora_ranks": "adaptive"}, "Invalid recovery lora_ranks 'adaptive'"),
        ({"lora_ranks": "importance", "method": "full"}, "method full trains no adapters"),
    ],
)
def test_bad_recipe_is_one_sentence(ids, fields, phrase):
    _, model = _pruned(ids)
    with pytest.raises(prunekit.PruneError, match=phrase.replace("(", r"\(")) as e:
        recover(model, fields, ids, progress=False)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_bad_model_teacher_and_tokens(ids):
    dense, model = _pruned(ids)
    with pytest.raises(prunekit.PruneError, match="has no pruned weights .* prune it first"):
        recover(tiny_model("llama"), {"steps": 2}, ids, progress=False)
    with pytest.raises(prunekit.PruneError, match="'distill' needs the dense model as teacher"):
        recover(model, {"method": "distill", "steps": 2}, ids, progress=False)
    with pytest.raises(prunekit.PruneError, match="only used by recovery method 'distill'"):
        recover(model, {"method": "perp", "steps": 2}, ids, teacher=dense, progress=False)
    with pytest.raises(prunekit.PruneError, match="2-D tensor"):
        recover(model, {"steps": 2}, ids[0], progress=False)
    with pytest.raises(prunekit.PruneError, match="vocabulary has 256"):
        recover(model, {"steps": 2}, ids + 1000, progress=False)
    _no_peft(model)


# ---- command line ----

def run(*args):
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True, env=ONE_THREAD)


def cli(capsys, monkeypatch, *args):
    """The CLI in this process (same main() as the installed script): (exit status, stdout, stderr)."""
    from tests.conftest import invoke

    return invoke(*args)


@pytest.fixture
def pruned_dir(tiny_dir, tmp_path):
    """The tiny Llama pruned by Wanda 50% and saved as `prunekit prune` would (manifest names its source)."""
    d, text = tiny_dir
    model, tok, _ = prunekit.load(d)
    ids = prunekit.calibration_batches(prunekit.tokenize(tok, prunekit.load_text(str(text), "calibration")), 8, 32)
    _, rep = prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, ids, progress=False)
    out = tmp_path / "pruned"
    prunekit.save(model, tok, out, {**rep.to_dict(), "source": str(d)})
    return out, d, text


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", ["perp", "distill"])
def test_cli_round_trip(pruned_dir, tmp_path, method):
    src, dense_dir, text = pruned_dir
    digest = _digest(src)
    out = tmp_path / "recovered"
    r = run("recover", str(src), "--method", method, "--steps", "20", "--lr", "3e-3", "--lora-rank", "4",
            "--text", str(text), "--samples", "16", "--seqlen", "32", "--batch-size", "4", "--eval-windows", "4",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "perplexity  pruned" in r.stdout and "saved" in r.stdout
    assert _digest(src) == digest  # the input is never touched
    man = json.loads((out / "prunekit.json").read_text())
    assert man["source"] == str(dense_dir) and man["recipe"]["method"] == "wanda"  # the pruning record is kept
    rec = man["recovery"]
    assert rec["recipe"]["method"] == method and rec["recipe"]["steps"] == 20 and rec["stats"]["steps"] == 20
    assert rec["teacher"] == (str(dense_dir) if method == "distill" else None)
    assert rec["metrics"]["perplexity_after"] < rec["metrics"]["perplexity_before"]
    # judged out of domain too: a text the recovery never saw, with agreement against the dense source
    ood = rec["metrics"]["ood"]
    assert ood["text"] == "shakespeare" and ood["shared_13grams_with_training"] == 0
    assert ood["perplexity_after"] > 0 and 0 <= ood["agreement_after"] <= 1 and ood["perplexity_dense"] > 0
    assert 0 <= rec["metrics"]["agreement_after"] <= 1 and "out of domain" in r.stdout
    pruned = AutoModelForCausalLM.from_pretrained(src)
    recovered = AutoModelForCausalLM.from_pretrained(out)
    assert type(recovered) is LlamaForCausalLM
    for (n, a), (_, b) in zip(_block_weights(pruned).items(), _block_weights(recovered).items()):
        assert torch.equal(a == 0, b == 0), n
    assert not [k for k in recovered.state_dict() if "lora" in k]


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--steps", "0"], "Invalid recovery steps"),
        (["--lr", "0"], "Invalid recovery lr"),
        (["--lora-rank", "0"], "Invalid recovery lora_rank"),
        (["--method", "sgd"], "Unknown recovery method"),
        (["--text", "nosuchtext"], "Unknown text"),
        (["--eval-windows", "0"], "--eval-windows must be positive"),
        (["--teacher", "x/y"], "only used by --method distill"),
        (["--samples", "100000"], "tokens but"),
    ],
)
def test_cli_bad_input_exit_2_nothing_written(pruned_dir, tmp_path, capsys, monkeypatch, args, phrase):
    src, _, text = pruned_dir
    out = tmp_path / "out"
    code, _, err = cli(capsys, monkeypatch, "recover", str(src), "--text", str(text), "--seqlen", "32",
                       "--steps", "2", "--out", str(out), *args)
    assert code == 2, err
    assert phrase in err and "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_unpruned_model_existing_output_and_missing_teacher(tiny_dir, pruned_dir, tmp_path, capsys, monkeypatch):
    d, text = tiny_dir
    src = pruned_dir[0]
    common = ["--text", str(text), "--seqlen", "32", "--steps", "2"]
    code, _, err = cli(capsys, monkeypatch, "recover", str(d), *common, "--out", str(tmp_path / "a"))
    assert code == 2 and "no pruned weights" in err and not (tmp_path / "a").exists()
    code, _, err = cli(capsys, monkeypatch, "recover", str(d), *common, "--method", "distill", "--out", str(tmp_path / "b"))
    assert code == 2 and "pass --teacher MODEL" in err and not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    code, _, err = cli(capsys, monkeypatch, "recover", str(src), *common, "--out", str(tmp_path / "c"))
    assert code == 2 and "already exists" in err and list((tmp_path / "c").iterdir()) == []
    code, _, err = cli(capsys, monkeypatch, "recover", str(src), *common, "--overwrite", "--out", str(src))
    assert code == 2 and "the input" in err


def test_cli_ctrl_c_exits_130_and_writes_nothing(pruned_dir, tmp_path):
    src, _, text = pruned_dir
    digest = _digest(src)
    out = tmp_path / "recovered"
    p = subprocess.Popen(
        [sys.executable, "-m", "prunekit.cli", "recover", str(src), "--steps", "100000", "--text", str(text),
         "--samples", "8", "--seqlen", "32", "--eval-text", "none", "--out", str(out)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ONE_THREAD,
        # a shell without job control starts background jobs with SIGINT ignored, and children inherit that:
        # give the CLI the default disposition, as a terminal's Ctrl-C would find it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in p.stderr:
        if line.startswith("training"):
            break
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "nothing was written" in err
    assert not out.exists() and _digest(src) == digest
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_ig_lora_ranks_follow_block_importance_with_the_same_total():
    from prunekit.train.recovery import block_ranks

    imp = [0.3, 0.9, 0.5, 0.1]
    r = block_ranks(imp, 8)
    assert sum(r) == 32 and min(r) >= 1
    assert sorted(range(4), key=lambda i: r[i]) == sorted(range(4), key=lambda i: imp[i])  # more important, more rank
    assert block_ranks([0.5] * 3, 4) == [4, 4, 4]


def test_ig_lora_recovery_gives_each_block_its_rank(ids):
    from prunekit.structure.similarity import block_distances, block_importance
    from prunekit.train.recovery import block_ranks

    _, model = _pruned(ids)
    adapter = adapter_for(model)
    want = block_ranks(block_importance(block_distances(adapter, model, ids[:8], 4)), 16)
    # the adapters really have those ranks, block by block
    masks = pruning_masks(model)
    peft_model = _attach_lora(model, masks, prunekit.recipe.Recovery(lora_rank=16), want)
    from peft.tuners.lora import LoraLayer

    got = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            i = int(name.split(".layers.")[1].split(".")[0])
            got.setdefault(i, set()).add(mod.lora_A["default"].weight.shape[0])
    peft_model.unload()
    assert [got[i] for i in sorted(got)] == [{r} for r in want]
    assert len(set(want)) > 1  # the tiny model's blocks differ: the ranks are not all alike

    before = _block_weights(model)
    _, stats = recover(model, {"method": "perp", **FAST, "lora_rank": 16, "lora_ranks": "importance"}, ids,
                       progress=False)
    assert stats["lora_ranks"] == want and sum(want) == 16 * len(want)
    for n, w in _block_weights(model).items():
        assert torch.equal(w == 0, before[n] == 0)
