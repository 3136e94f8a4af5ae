"""Mixture-of-experts pruning and merging (prunekit.structure.experts) on tiny random MoE models of the four
families: the routing and expert math by hand equal the model's, removal is exact, the saved model is stock."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.arch import adapter_for
from prunekit.errors import PruneError
from prunekit.structure import experts as X

from tests.conftest import VOCAB, byte_tokenizer, randomized

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def tiny_moe(family: str, experts: int = 6, top_k: int = 2, layers: int = 2, hidden: int = 32, seed: int = 0,
             norm: bool | None = None):
    import transformers as t

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=top_k, bos_token_id=0,
                  eos_token_id=1, pad_token_id=1)
    if family == "mixtral":
        cfg, cls = t.MixtralConfig(**common, intermediate_size=16, num_local_experts=experts), t.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                               num_experts=experts, norm_topk_prob=bool(norm))
        cls = t.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, num_experts=experts, head_dim=8,
                               norm_topk_prob=True if norm is None else norm)
        cls = t.Qwen3MoeForCausalLM
    elif family == "olmoe":
        cfg = t.OlmoeConfig(**common, intermediate_size=16, num_experts=experts, norm_topk_prob=bool(norm))
        cls = t.OlmoeForCausalLM
    else:
        raise ValueError(family)
    return randomized(cls(cfg))


@pytest.fixture
def ids():
    return torch.randint(2, VOCAB, (8, 16), generator=torch.Generator().manual_seed(3))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def moe_input(model, ids, layer=0):
    """The rows entering layer ``layer``'s MoE module in the model's own forward."""
    got = []
    moe = dict(adapter_for(model).moe_layers(model))[layer]
    h = moe.register_forward_pre_hook(lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    logits(model, ids)
    h.remove()
    return torch.cat(got)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_and_expert_math_by_hand_equal_the_models(family, ids):
    model = tiny_moe(family)
    ad = adapter_for(model)
    i, moe = ad.moe_layers(model)[0]
    x = moe_input(model, ids, i)
    router, experts = ad.router(moe), ad.experts(moe)
    with torch.no_grad():
        _, w_ref, idx_ref = router(x)
        _, w, idx = X.route(router, x)
        assert torch.equal(idx, idx_ref) and torch.allclose(w, w_ref.to(w.dtype), atol=1e-6)
        outs = torch.stack([X.expert_forward(experts, e, x) for e in range(router.weight.shape[0])])
        want = experts(x, idx_ref, w_ref)
        assert torch.allclose(X.routed_output(w, idx, outs), want, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_keeping_every_expert_is_bit_identical(family, ids):
    model = tiny_moe(family)
    before = logits(model, ids)
    for _, moe in adapter_for(model).moe_layers(model):
        X.keep_experts(adapter_for(model), moe, list(range(6)))
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_removing_an_expert_the_router_never_selects_leaves_the_logits(family, ids):
    model = tiny_moe(family, experts=8, norm=True)  # routers that renormalise their top-k weights
    ad = adapter_for(model)
    with torch.no_grad():
        # rows 0/1 and 2/4 are opposite, so two logits are >= 0 for every token; row 3 is 0: never in a top-2
        for _, moe in ad.moe_layers(model):
            r = ad.router(moe)
            r.weight[1] = -r.weight[0]
            r.weight[4] = -r.weight[2]
            r.weight[3] = 0
    before = logits(model, ids)
    _, rep = prunekit.prune(model, {"experts": {"method": "frequency", "keep": 7}}, ids, progress=False)
    assert all(v[3] == 0 for v in rep.summary["frequency"].values())  # the premise, on these seeded inputs
    assert all(3 not in v for v in rep.summary["kept"].values())
    assert torch.allclose(logits(model, ids), before, atol=1e-5)


def test_reap_scores_equal_a_direct_computation(ids):
    model = tiny_moe("olmoe", norm=False)  # routes with raw probabilities: REAP still renormalises the top-k
    ad = adapter_for(model)
    i, moe = ad.moe_layers(model)[0]
    x = moe_input(model, ids, i)
    st = X.layer_stats(ad, moe, x, max_tokens=64)
    r, ex = ad.router(moe), ad.experts(moe)
    with torch.no_grad():
        probs = torch.softmax(x @ r.weight.t(), -1)
        top_w, top_i = probs.topk(2, -1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        for e in range(6):
            total, n = 0.0, 0
            for t in range(x.shape[0]):
                for j in range(2):
                    if int(top_i[t, j]) == e:
                        g, u = (ex.gate_up_proj[e] @ x[t]).chunk(2)
                        out = ex.down_proj[e] @ (torch.nn.functional.silu(g) * u)
                        total += float(top_w[t, j]) * float(out.norm())
                        n += 1
            assert int(st.frequency[e]) == n
            assert float(st.reap[e]) == pytest.approx(total / n if n else 0.0, rel=1e-4, abs=1e-6)
    assert st.frequency.sum() == 2 * x.shape[0]


def test_merging_two_identical_experts_equals_either(ids):
    model = tiny_moe("mixtral", experts=4)
    ad = adapter_for(model)
    i, moe = ad.moe_layers(model)[0]
    ex = ad.experts(moe)
    with torch.no_grad():
        ex.gate_up_proj[2].copy_(ex.gate_up_proj[0])
        ex.down_proj[2].copy_(ex.down_proj[0])
    want_gu, want_dn = ex.gate_up_proj[0].clone(), ex.down_proj[0].clone()
    X.merge_into_centres(ex, {0: [2], 1: [], 3: []}, torch.tensor([5.0, 1.0, 3.0, 2.0]))
    assert torch.allclose(ex.gate_up_proj[0], want_gu, atol=1e-6) and torch.allclose(ex.down_proj[0], want_dn, atol=1e-6)


def test_alignment_undoes_a_neuron_permutation():
    model = tiny_moe("mixtral", experts=4)
    ad = adapter_for(model)
    ex = ad.experts(ad.moe_layers(model)[0][1])
    inter = ex.gate_up_proj.shape[1] // 2
    perm = torch.randperm(inter, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g = ex.gate_up_proj[0]
        ex.gate_up_proj[1].copy_(torch.cat([g[:inter][perm], g[inter:][perm]]))
        ex.down_proj[1].copy_(ex.down_proj[0][:, perm])
    back = X.align(ex, 0, 1)
    assert torch.equal(perm[back], torch.arange(inter))
    # the same function, so merging the permuted copy with weights 1:1 gives expert 0 back
    want = ex.gate_up_proj[0].clone()
    X.merge_into_centres(ex, {0: [1]}, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(ex.gate_up_proj[0], want, atol=1e-6)


def test_enumerate_finds_the_best_subset_and_greedy_falls_back(ids):
    model = tiny_moe("qwen3_moe", experts=5)
    ad = adapter_for(model)
    i, moe = ad.moe_layers(model)[0]
    st = X.layer_stats(ad, moe, moe_input(model, ids, i), max_tokens=128)
    best, info = X.enumerate_keep(ad, moe, st, 3, max_subsets=100)
    assert info["search"] == "exhaustive" and info["subsets"] == 10
    r, ex = ad.router(moe), ad.experts(moe)
    with torch.no_grad():
        outs = torch.stack([X.expert_forward(ex, e, st.x) for e in range(5)])
        _, w, idx = X.route(r, st.x)
        target = X.routed_output(w, idx, outs)
        errs = {c: X.reconstruction_error(r, outs, st.x, list(c), target) for c in __import__("itertools").combinations(range(5), 3)}
    assert tuple(best) == min(errs, key=errs.get)
    greedy, ginfo = X.enumerate_keep(ad, moe, st, 3, max_subsets=5)
    assert ginfo["search"] == "greedy" and len(greedy) == 3 and ginfo["error"] >= info["error"] - 1e-9


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["frequency", "reap", "enumerate", "merge"])
def test_saved_model_is_stock_and_reloads_with_identical_logits(family, method, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_moe(family)
    ad = adapter_for(model)
    shared = {n: p.clone() for n, p in (ad.shared_expert(ad.moe_layers(model)[0][1]) or torch.nn.Module()).named_parameters()}
    _, rep = prunekit.prune(model, {"experts": {"method": method, "keep": 3}}, ids, progress=False)
    assert rep.summary["format"] == "stock" and rep.summary["experts_removed"] == "6/12"
    for _, moe in ad.moe_layers(model):
        assert ad.router(moe).weight.shape[0] == 3 and ad.experts(moe).gate_up_proj.shape[0] == 3
    prunekit.save(model, None, tmp_path / "out", rep.to_dict())
    from transformers import AutoConfig

    assert getattr(AutoConfig.from_pretrained(tmp_path / "out"), ad.moe.count_key) == 3
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(back, ids), logits(model, ids))
    if family == "qwen2_moe":  # the shared expert is untouched
        after = dict(ad.shared_expert(ad.moe_layers(model)[0][1]).named_parameters())
        assert shared and all(torch.equal(after[n], p) for n, p in shared.items())


def test_global_budget_differs_per_layer_and_prunekit_load_rebuilds_it(ids, tmp_path):
    model = tiny_moe("mixtral", experts=6, layers=3)
    ad = adapter_for(model)
    # layer 0's router sends every token to expert 0 or 1 (opposite rows, large) and its second choice to one of
    # four near-zero rows: those four have a lower share of their layer than any expert of a random layer
    with torch.no_grad():
        r = ad.router(ad.moe_layers(model)[0][1])
        r.weight[2:] *= 0.01
        r.weight[0] *= 20
        r.weight[1] = -r.weight[0]
    _, rep = prunekit.prune(model, {"experts": {"method": "frequency", "keep": 3, "allocation": "global"}}, ids,
                            progress=False)
    counts = rep.summary["experts_after"]
    assert sum(counts.values()) == 9 and counts["0"] == 2 and sorted(counts.values()) == [2, 3, 4]
    assert rep.summary["kept"]["0"] == [0, 1]
    assert rep.summary["format"] == "prunekit"
    out = tmp_path / "g"
    prunekit.save(model, byte_tokenizer(), out, rep.to_dict())
    assert json.loads((out / "config.json").read_text())["model_type"].startswith("prunekit-")
    run = prunekit.load(out)
    assert torch.equal(logits(run.model, ids), logits(model, ids))


def test_router_recalibration_lowers_the_layer_error(ids):
    model = tiny_moe("olmoe", experts=6)
    _, rep = prunekit.prune(model, {"experts": {"method": "frequency", "keep": 3, "recalibrate_steps": 30,
                                                 "recalibrate_lr": 1e-2}}, ids, progress=False)
    rc = rep.summary["router_recalibration"]
    assert all(v["error_after"] <= v["error_before"] for v in rc.values())
    assert any(v["error_after"] < v["error_before"] for v in rc.values())


def test_bad_requests_are_one_sentence(ids):
    from prunekit.recipe import Recipe

    model = tiny_moe("mixtral", experts=4, top_k=2)
    with pytest.raises(PruneError, match="fewer than the router's top-k"):
        prunekit.prune(model, {"experts": {"method": "reap", "keep": 1}}, ids, progress=False)
    with pytest.raises(PruneError, match="no mixture-of-experts layers"):
        from tests.conftest import tiny_model

        prunekit.prune(tiny_model("llama"), {"experts": {"method": "reap", "keep": 2}}, ids, progress=False)
    with pytest.raises(PruneError, match="global expert budget"):
        prunekit.prune(model, {"experts": {"method": "enumerate", "keep": 2, "allocation": "global"}}, ids, progress=False)
    with pytest.raises(PruneError, match="keep or sparsity"):
        Recipe.make(experts={"method": "reap", "keep": 2, "sparsity": 0.5})
    with pytest.raises(PruneError, match="choose one of"):
        Recipe.make(experts={"method": "nope", "keep": 2})
    with pytest.raises(PruneError, match="drop structure"):
        Recipe.make(experts={"method": "reap", "keep": 2}, structure={"kinds": ["heads"], "sparsity": 0.5})
    # nothing was changed by the refused requests
    assert adapter_for(model).router(adapter_for(model).moe_layers(model)[0][1]).weight.shape[0] == 4


def test_cli_prunes_experts_and_refuses_mistakes(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    from tests.conftest import invoke

    _, text = tiny_dir
    model = tiny_moe("qwen2_moe", experts=6)
    d = tmp_path / "moe"
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    out = tmp_path / "out"
    common = ["--calib", text, "--calib-samples", "8", "--seqlen", "32", "--eval-windows", "2", "--generations", "0"]
    rc, so, se = invoke("prune", d, "--experts", "reap", "--keep-experts", "3", *common, "--out", out)
    assert rc == 0, se
    assert "experts removed 6/12" in so and "stock qwen2_moe config with 3 experts" in so
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["experts"]["method"] == "reap" and man["recipe"]["experts"]["keep"] == 3
    assert AutoModelForCausalLM.from_pretrained(out).config.num_experts == 3
    for args, words in [
        (["--experts", "reap", "--keep-experts", "1"], "fewer than the router's top-k"),
        (["--keep-experts", "3"], "go with --experts"),
        (["--experts", "reap", "--keep-experts", "3", "--sparsity", "0.5"], "keep or sparsity"),
        (["--experts", "nope", "--keep-experts", "3"], "choose one of"),
    ]:
        bad = tmp_path / "bad"
        rc, so, se = invoke("prune", d, *args, *common, "--out", bad)
        assert rc == 2 and words in se and not bad.exists(), (args, se)
    rc, so, se = invoke("prune", tiny_dir[0], "--experts", "reap", "--keep-experts", "2", *common, "--out", tmp_path / "x")
    assert rc == 2 and "no mixture-of-experts layers" in se


@pytest.mark.slow
def test_upcycled_smollm2_prunes_to_a_stock_checkpoint(tmp_path):
    """At real size: SmolLM2-135M upcycled into 8 experts computes what SmolLM2 computes (no noise), and after
    keeping 2 experts per layer the saved checkpoint reloads with stock transformers with the same logits."""
    from transformers import AutoModelForCausalLM

    from prunekit.batches import calibration_batches, tokenize
    from prunekit.zoo.models import load_model
    from prunekit.zoo.moe import upcycle_smollm2
    from prunekit.zoo.text import load_text

    moe, tok = upcycle_smollm2(noise=0.0)
    dense, _ = load_model("smollm2-135m")
    x = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = dense(input_ids=x).logits
        assert float((moe(input_ids=x).logits - ref).abs().max()) < 1e-3
    del dense
    cal = calibration_batches(tokenize(tok, load_text("shakespeare", "calibration")), 4, 64, seed=0)
    _, rep = prunekit.prune(moe, {"experts": {"method": "reap", "keep": 2}}, cal, progress=False)
    assert rep.summary["experts_removed"] == "180/240" and rep.summary["format"] == "stock"
    prunekit.save(moe, tok, tmp_path / "small", rep.to_dict())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert back.config.num_local_experts == 2
    with torch.no_grad():
        got = back(input_ids=x).logits
        assert torch.equal(got, moe(input_ids=x).logits)
        # the experts were identical copies: the two kept in each layer still compute SmolLM2
        assert float((got - ref).abs().max()) < 1e-3


def test_expert_counts_that_do_not_fit_the_model_are_one_sentence(ids, tmp_path):
    model = tiny_moe("olmoe", experts=6, layers=2)
    ad = adapter_for(model)
    X.keep_experts(ad, ad.moe_layers(model)[0][1], [0, 1, 2])
    assert X.finalize_expert_config(ad, model) == "prunekit"
    prunekit.save(model, byte_tokenizer(), tmp_path / "m")
    assert torch.equal(logits(prunekit.load(tmp_path / "m").model, ids), logits(model, ids))
    for counts, words in [([3, 6, 6], "lists 3 layers"), ([3, 7], "cannot hold")]:
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        cfg["prunekit_expert_counts"] = counts
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(PruneError, match=words):
            prunekit.load(tmp_path / "m")
