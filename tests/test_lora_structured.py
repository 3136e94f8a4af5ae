"""LoRAPrune (criterion loraprune) and Compresso (learn compresso) on tiny random models."""

from __future__ import annotations

import pytest
import torch

from prunekit.arch import adapter_for
from prunekit.linear import weight_matrix
from prunekit.recipe import Recipe
from prunekit.structure import compresso as cp
from prunekit.structure import hardconcrete as hc
from prunekit.structure import loraprune as lp
from prunekit.structure import prune_structured
from prunekit.structure.shrink import block_heads, block_width
from tests.conftest import error_line, invoke, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are slower with two threads on a busy 2-core machine than with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(n=8, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _recipe(**st):
    return Recipe.make(structure={"kinds": ["heads", "mlp"], "sparsity": 0.5, **st})


def _with_lora_grads(model):
    lora = lp.LoRA(model, rank=4, alpha=8.0, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.params:  # peft starts B at 0: give both adapters values so every term of the formula counts
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ids = _ids(2)
    model(input_ids=ids, labels=ids).loss.backward()
    return lora


def _hand(layer):
    """|(W + s B A) * (gB A + B gA - gB gA)|, written out."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w = weight_matrix(layer.base_layer) + layer.scaling["default"] * (b @ a)
    g = b.grad @ a + b @ a.grad - b.grad @ a.grad
    return (w * g).abs()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loraprune_score_is_the_hand_formula_and_base_weights_get_no_gradient(family):
    model = tiny_model(family, layers=2)
    adapter = adapter_for(model)
    lora = _with_lora_grads(model)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None and not p.requires_grad for p in base)  # frozen: no full-size gradient at all
    scores = lp.lora_scores(adapter, model, lora, normalize=False)
    normed = lp.lora_scores(adapter, model, lora, normalize=True)
    hd = adapter.head_dim(model)
    with lp.base_view(model):
        blocks = adapter.blocks(model)
        parts = [adapter.attn_parts(b) for b in blocks]
        mlps = [adapter.mlp_parts(b) for b in blocks]
        sizes = [block_heads(adapter, model, b) for b in blocks]  # the base layers' shapes (GPT-2: Conv1D)
    for i in range(2):
        e = {k: _hand(lora.layers[id(m)]) for k, m in parts[i].items()}
        h, k = sizes[i]
        if "qkv" in e:
            rows = e["qkv"].sum(1)
            q, kv = rows[: h * hd], rows[h * hd: (h + k) * hd] + rows[(h + k) * hd:]
        else:
            q, kv = e["q"].sum(1), e["k"].sum(1) + e["v"].sum(1)
        heads = q.view(h, hd).sum(1) + e["o"].sum(0).view(h, hd).sum(1)
        ins, out = mlps[i]
        mlp = sum(_hand(lora.layers[id(m)]).sum(1) for m in ins) + _hand(lora.layers[id(out)]).sum(0)
        torch.testing.assert_close(scores[i].heads, heads, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores[i].kv, kv.view(k, hd).sum(1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores[i].mlp, mlp, rtol=1e-5, atol=1e-7)
        if "q" in e:  # the paper's normalization: each matrix's group scores to unit L2 norm, then summed
            unit = lambda v: v / (v.norm() + 1e-8)  # noqa: E731
            want = unit(e["q"].sum(1).view(h, hd).sum(1)) + unit(e["o"].sum(0).view(h, hd).sum(1))
            torch.testing.assert_close(normed[i].heads, want, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in base)
    lora.discard()
    assert all(p.requires_grad for p in model.parameters())  # flags as they were


def test_moving_average_follows_beta():
    ema = lp.MovingScores(0.75)
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([4.0, 4.0])]
    for x in xs:
        ema.update([cp.imp.LayerScores(x.clone(), None, 2 * x)])
    want = sum(0.25 * 0.75 ** (len(xs) - 1 - j) * x for j, x in enumerate(xs))  # zeros at the start
    torch.testing.assert_close(ema.value[0].heads, want)
    torch.testing.assert_close(ema.value[0].mlp, 2 * want)
    assert ema.value[0].kv is None and ema.steps == 3


def test_training_averages_each_step_score_before_the_optimizer_step(monkeypatch):
    model = tiny_model("llama", layers=2)
    st = _recipe(criterion="loraprune", beta=0.5, lora_steps=6, rounds=2, lora_batch_size=2).structure
    seen = []
    real = lp.lora_scores

    def spy(adapter, model, lora, normalize=True):
        # at the optimizer step: adapters have gradients, no base weight has one or requires one
        assert all(p.grad is not None for p in lora.params)
        assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        real(adapter, model, lora)
        step = len(seen) + 1
        seen.append(step)
        return [cp.imp.LayerScores(torch.full((4,), float(step)), torch.zeros(2), torch.full((128,), -float(step)))
                for _ in range(2)]

    monkeypatch.setattr(lp, "lora_scores", spy)
    ids = _ids()
    scores, res, trainable = lp.train_segment(model, st, ids, 3, lp._index_stream(8, 2, 0), score=True, progress=False)
    assert seen == [1, 2, 3] and len(res.losses) == 3 and trainable > 0
    want = 0.5 * (3 + 0.5 * 2 + 0.25 * 1)
    assert torch.allclose(scores[0].heads, torch.full((4,), want))
    assert torch.allclose(scores[1].mlp, torch.full((128,), -want))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # merged, no peft layer left


@pytest.mark.parametrize("global_rank", [False, True])
def test_loraprune_reaches_the_one_shot_target_in_rounds(global_rank):
    model, ref = tiny_model("llama", layers=2), tiny_model("llama", layers=2)
    ids = _ids()
    # global: whole kv groups, so that a round's removal leaves the units of the next round the same kind
    how = dict(global_rank=True, gqa="kv", sparsity=0.3) if global_rank else dict(sparsity=0.5)
    rec = _recipe(criterion="loraprune", rounds=2, lora_steps=3, lora_batch_size=2, **how)
    out, rep = prune_structured(model, rec, ids, progress=False)
    want, wrep = prune_structured(ref, _recipe(criterion="magnitude", **how), progress=False)
    adapter = adapter_for(out)
    got = [(block_heads(adapter, out, b), block_width(adapter, b)) for b in adapter.blocks(out)]
    exp = [(block_heads(adapter, want, b), block_width(adapter, b)) for b in adapter.blocks(want)]
    assert sum(h[0] for h, _ in got) == sum(h[0] for h, _ in exp) and sum(w for _, w in got) == sum(w for _, w in exp)
    if not global_rank:
        assert got == exp and rep.summary["format"] == "stock"
    s = rep.summary
    assert (s["heads_removed"], s["mlp_removed"]) == (wrep.summary["heads_removed"], wrep.summary["mlp_removed"])
    assert len(s["parts"]) == 2
    assert s["loraprune"]["segment_steps"] == [1, 1, 1] and s["params"] == sum(p.numel() for p in out.parameters())
    assert torch.isfinite(out(input_ids=ids).logits).all()


def test_a_caller_that_prunes_in_parts_gets_one_lora_scoring_segment_per_part(monkeypatch):
    model = tiny_model("llama", layers=2)
    calls = []
    real = lp.train_segment

    def spy(model, st, ids, steps, stream, **kw):
        calls.append((steps, kw["score"]))
        return real(model, st, ids, steps, stream, **kw)

    monkeypatch.setattr(lp, "train_segment", spy)
    rec = _recipe(criterion="loraprune", rounds=2, lora_steps=6, lora_batch_size=2)
    out, rep = prune_structured(model, rec, _ids(), progress=False, amounts={"heads": 1, "mlp": 10})  # distill's parts
    assert calls == [(2, True)] and rep.summary["mlp_removed"] == "20/256" and rep.summary["heads_removed"] == "4/8"


def test_hard_concrete_gates_are_binary_as_the_temperature_goes_to_zero():
    la = torch.linspace(-3, 3, 4000)
    cold = hc.sample(la, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert set(cold.unique().tolist()) <= {0.0, 1.0} and 0 < cold.mean() < 1
    warm = hc.sample(la, generator=torch.Generator().manual_seed(0))
    assert ((warm > 0) & (warm < 1)).any()
    # P(z != 0) in closed form against samples (both near la = 1)
    la1 = torch.full((20000,), 1.0)
    freq = (hc.sample(la1, generator=torch.Generator().manual_seed(1)) > 0).float().mean()
    assert abs(float(freq) - float(hc.prob_nonzero(la1[:1]))) < 0.01
    assert hc.deterministic_gate(torch.tensor([-10.0, 10.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("above", [True, False])
def test_the_size_penalty_pushes_log_alpha_towards_the_target(above):
    model = tiny_model("llama", layers=2)
    gates = cp.Gates(adapter_for(model), model, _recipe(learn="compresso").structure)
    with torch.no_grad():
        for p in gates.log_alpha.values():
            p.fill_(3.0 if above else -3.0)  # expected kept share ~0.99 (above the 0.5 target) or ~0.2 (below)
        gates.lambdas["heads_2"].fill_(1.0)  # lambda1 = 0: the quadratic term alone
        gates.lambdas["mlp_2"].fill_(1.0)
    gates.penalty().backward()
    grads = torch.cat([p.grad for p in gates.log_alpha.values()])
    assert (grads > 0).all() if above else (grads < 0).all()  # descent lowers (raises) log_alpha: fewer (more) kept
    gap = gates.gaps("mlp")
    # the multipliers climb: their gradient is minus d(penalty)/d(lambda), so one step of any minimizer gives
    # lambda1 the sign of s - t, after which the linear term pushes the same way as the quadratic one
    torch.testing.assert_close(gates.lambdas["mlp_1"].grad, -gap.sum().detach())
    torch.testing.assert_close(gates.lambdas["mlp_2"].grad, -gap.pow(2).sum().detach())
    torch.optim.SGD(list(gates.lambdas.values()), lr=1.0).step()
    assert (float(gates.lambdas["mlp_1"].detach()) > 0) == above
    for p in gates.log_alpha.values():
        p.grad = None
    with torch.no_grad():
        gates.lambdas["mlp_2"].zero_()
        gates.lambdas["heads_2"].zero_()
    gates.penalty().backward()
    assert (gates.log_alpha["mlp_0"].grad > 0).all() == above


@pytest.mark.parametrize("family,gqa,global_rank", [("llama", "query", False), ("llama", "kv", True),
                                                    ("gpt2", "query", True)])
def test_made_permanent_model_meets_the_target_exactly_and_computes_the_masked_logits(family, gqa, global_rank):
    model = tiny_model(family, layers=3)
    adapter = adapter_for(model)
    st = _recipe(learn="compresso", gqa=gqa, global_rank=global_rank, sparsity=0.4).structure
    gates = cp.Gates(adapter, model, st)
    with torch.no_grad():
        for p in gates.log_alpha.values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 2)
    gates.freeze()
    for z in gates.fixed.values():
        assert (z > 0).sum() <= z.numel()
    ids = _ids(2, 16)
    handles = cp.attach_gates(adapter, model, gates)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    units = {k: [u.scores.numel() for u in gates.units[k]] for k in gates.kinds}
    blocks = adapter.blocks(model)
    width0 = [block_width(adapter, b) for b in blocks]
    summary = cp.make_permanent(adapter, model, gates)
    with torch.no_grad():
        shrunk = model(input_ids=ids).logits
    torch.testing.assert_close(shrunk, masked, rtol=1e-4, atol=1e-5)
    for kind in gates.kinds:  # the kept count is exactly the target's, per layer (uniform) or in all (global)
        gone = [len(r) for r in gates.removed[kind]]
        assert gone == gates.remove[kind] if not global_rank else sum(gone) == sum(gates.remove[kind])
        assert all(g < n for g, n in zip(gone, units[kind]))  # every layer keeps a unit
    for i, b in enumerate(blocks):
        members = gates.units["heads"][i].members
        assert block_heads(adapter, model, b)[0] == 4 - sum(len(members[j][0]) for j in gates.removed["heads"][i])
        assert block_width(adapter, b) == width0[i] - len(gates.removed["mlp"][i])
    assert summary["params"] == summary["params_expected"] == sum(p.numel() for p in model.parameters())
    if not global_rank:
        assert summary["format"] == "stock"


def test_compresso_learns_then_removes_for_real():
    model = tiny_model("llama", layers=2)
    ids = _ids()
    rec = _recipe(learn="compresso", lora_steps=10, lora_batch_size=2, gate_lr=0.5)
    out, rep = prune_structured(model, rec, ids, progress=False)
    s = rep.summary
    assert s["heads_removed"] == "4/8" and s["mlp_removed"] == "128/256" and s["format"] == "stock"
    c = s["compresso"]
    assert (c["steps"], c["gate_steps"], c["finetune_steps"]) == (10, 5, 5) and c["gates"]["mlp"]["target_kept"] == 0.5
    start = float(hc.prob_nonzero(hc.init_log_alpha(1, noise=0.0)))
    assert c["gates"]["mlp"]["expected_kept"] < start and c["gates"]["mlp"]["lambda1"] > 0  # pulled towards 0.5
    assert all(p.requires_grad and p.grad is None for p in out.parameters())
    assert not out._forward_pre_hooks and all(not m._forward_pre_hooks for m in out.modules())
    assert type(out.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert torch.isfinite(out(input_ids=ids).logits).all()


def test_the_collaborative_prompt_is_put_before_every_window_and_not_scored(monkeypatch):
    from tests.conftest import byte_tokenizer

    model = tiny_model("llama", layers=2)
    seen = []
    real = model.forward

    def spy(*a, **kw):
        seen.append((kw["input_ids"].clone(), kw.get("labels")))
        return real(*a, **kw)

    monkeypatch.setattr(model, "forward", spy)
    ids = _ids(4, 16)
    rec = _recipe(learn="compresso", lora_steps=1, lora_batch_size=2, collaborative_prompt=True)
    cp.prune_compresso(model, rec, ids, progress=False, tokenizer=byte_tokenizer())
    prompt = cp.prompt_ids(model, byte_tokenizer())
    x, labels = seen[0]
    p = prompt.numel()
    assert x.shape[1] == p + 16 and (x[:, :p] == prompt).all() and (labels[:, :p] == -100).all()
    assert (labels[:, p:] == x[:, p:]).all()


@pytest.mark.parametrize("args,words", [
    (["--learn", "kompresso"], "learn"),
    (["--criterion", "loraprune", "--structure", "hidden"], "heads and MLP channels only"),
    (["--criterion", "loraprune", "--beta", "1.5"], "beta"),
    (["--criterion", "loraprune", "--rounds", "0"], "rounds"),
    (["--criterion", "loraprune", "--rounds", "4", "--lora-steps", "3"], "lora_steps"),
    (["--collaborative-prompt"], "collaborative_prompt goes with learn compresso"),
    (["--learn", "compresso", "--bias-compensation"], "bias_compensation"),
    (["--learn", "compresso", "--remove-layers", "1"], "heads and MLP channels only"),
    (["--learn", "compresso", "--distill", "4", "--distill-iterations", "2"], "set distill iterations to 1"),
    (["--learn", "compresso", "--lora-batch-size", "0"], "lora_batch_size"),
])
def test_bad_flags_exit_2_with_one_sentence(tiny_dir, tmp_path, args, words):
    d, text = tiny_dir
    base = ["--structure", "heads,mlp"] if "--structure" not in args else []
    rc, _out, err = invoke("prune", d, *base, "--sparsity", "0.5", *args, "--calib", text, "--out", tmp_path / "o")
    assert rc == 2
    assert words in error_line(err)
    assert not (tmp_path / "o").exists()


def test_prune_cli_runs_both_and_says_so(tiny_dir, tmp_path, monkeypatch):
    import re

    from transformers import AutoModelForCausalLM

    d, text = tiny_dir
    monkeypatch.setenv("COLUMNS", "250")  # rich cuts long option names in a narrow terminal
    rc, out, err = invoke("prune", d, "--help")
    out = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", out))
    for flag in ("--learn", "--rounds", "--beta", "--lora-steps", "--lora-lr", "--lora-rank", "--lora-alpha",
                 "--lora-batch-size", "--gate-lr",
                 "--collaborative-prompt", "loraprune", "compresso"):
        assert flag in out
    common = ["--structure", "heads,mlp", "--sparsity", "0.5", "--calib", text, "--calib-samples", "4", "--seqlen",
              "32", "--lora-steps", "3", "--eval-windows", "2", "--generations", "0", "--quiet"]
    rc, out, err = invoke("prune", d, *common, "--learn", "compresso", "--collaborative-prompt",
                          "--out", tmp_path / "c")
    assert rc == 0, err
    assert "by learned masks (compresso)" in out and "heads removed 4/8" in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "c").config.num_attention_heads == 2
    rc, out, err = invoke("prune", d, *common, "--criterion", "loraprune", "--rounds", "2", "--out", tmp_path / "l")
    assert rc == 0, err
    assert "by loraprune" in out and "MLP channels removed 128/256" in out
