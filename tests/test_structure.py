"""Structured pruning: adapters know the structure, shrinking is exact, plans are kept, saved models reload."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.arch import adapter_for
from prunekit.linear import weight_matrix
from prunekit.structure import importance as imp
from prunekit.structure.layers import greedy_sublayers, influences
from prunekit.structure.saved import finalize_config
from prunekit.structure.shrink import (
    block_heads,
    block_width,
    count_params,
    remove_attention,
    remove_blocks,
    remove_mlp,
    shrink_heads,
    shrink_mlp,
)
from tests.conftest import FAMILIES, byte_tokenizer, tiny_model

# query heads, kv heads, MLP width, head_dim of the tiny models in conftest (hidden 64, 4 heads)
SIZES = {"llama": (4, 2, 128), "qwen2": (4, 2, 128), "mistral": (4, 2, 128), "gpt2": (4, 4, 256), "opt": (4, 4, 128)}
HD = 16
ATOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def o_proj(adapter, block):
    return adapter.attn_parts(block)["o"]


@pytest.fixture
def ids():
    return torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ 1. adapters
def test_adapters_know_the_structure(family):
    model = tiny_model(family)
    a = adapter_for(model)
    assert a.layout is not None and a.head_dim(model) == HD
    for block in a.blocks(model):
        h, kv, width = SIZES[family]
        assert block_heads(a, model, block) == (h, kv)
        assert block_width(a, block) == width
        ins, out = a.mlp_parts(block)
        assert all(weight_matrix(m).shape == (width, 64) for m in ins) and weight_matrix(out).shape == (64, width)
        assert weight_matrix(o_proj(a, block)).shape == (64, h * HD)


def test_unknown_architecture_is_a_clear_error():
    import transformers as t

    cfg = t.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=256)
    model = t.GPTNeoXForCausalLM(cfg).eval()
    with pytest.raises(prunekit.PruneError, match="does not know where this model keeps its attention heads"):
        prunekit.prune(model, {"structure": {"kinds": ["mlp"], "ratio": 0.5, "criterion": "magnitude"}})


# ------------------------------------------------------------------ 2. equivalence of shrinking
def _zero_heads(adapter, model, layer, heads):
    o = weight_matrix(o_proj(adapter, adapter.blocks(model)[layer]))
    for h in heads:
        o[:, h * HD : (h + 1) * HD] = 0


def _zero_channels(adapter, model, layer, channels):
    weight_matrix(adapter.mlp_parts(adapter.blocks(model)[layer])[1])[:, channels] = 0


@pytest.mark.parametrize("mode", ["query", "kv"])
def test_removing_heads_equals_zeroing_their_o_columns(family, mode, ids):
    model = tiny_model(family)
    a = adapter_for(model)
    h, kv, _ = SIZES[family]
    if kv < h and mode == "query":  # one query head from each kv group (groups {0,1}, {2,3})
        gone = [[0, 3], [1, 2]]
    elif kv < h:  # a whole kv group: its two query heads with their k/v head
        gone = [[2, 3], [0, 1]]
    else:
        gone = [[1, 2], [0]]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads in enumerate(gone):
            _zero_heads(a, ref, layer, heads)
    before = count_params(model)
    with torch.no_grad():
        for layer, heads in enumerate(gone):
            shrink_heads(a, model, layer, [x for x in range(h) if x not in heads])
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=ATOL)
    # the parameter count, from the shapes of the tiny models: q rows + o columns per query head, k + v rows per kv head
    per_q = 2 * 64 * HD + (HD if family in ("qwen2", "gpt2", "opt") else 0)  # q bias: qwen2, gpt2, opt
    per_kv = 2 * 64 * HD + (2 * HD if family in ("qwen2", "gpt2", "opt") else 0)
    q_gone = sum(len(g) for g in gone)
    kv_gone = q_gone if kv == h else (0 if mode == "query" else sum(len(g) for g in gone) // (h // kv))
    assert before - count_params(model) == q_gone * per_q + kv_gone * per_kv
    expect = (2, 2) if kv == h or mode == "query" else (2, 1)
    assert block_heads(a, model, a.blocks(model)[0]) == expect


def test_removing_mlp_channels_equals_zeroing_their_down_columns(family, ids):
    model = tiny_model(family)
    a = adapter_for(model)
    width = SIZES[family][2]
    gone = [list(range(0, width, 3)), list(range(5, 40))]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, ch in enumerate(gone):
            _zero_channels(a, ref, layer, ch)
    before = count_params(model)
    with torch.no_grad():
        for layer, ch in enumerate(gone):
            shrink_mlp(a, model, layer, [c for c in range(width) if c not in ch])
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=ATOL)
    n_in = 2 if family in ("llama", "qwen2", "mistral") else 1  # gate + up, or fc1 / c_fc (with a bias)
    per_channel = n_in * 64 + 64 + (1 if family in ("gpt2", "opt") else 0)
    assert before - count_params(model) == sum(map(len, gone)) * per_channel


def test_gqa_split_that_gqa_cannot_express_is_refused():
    model = tiny_model("llama")
    a = adapter_for(model)
    with pytest.raises(prunekit.PruneError, match="grouped-query attention cannot express"):
        shrink_heads(a, model, 0, [0, 1, 2])  # group 0 keeps 2 query heads, group 1 keeps 1
    with pytest.raises(prunekit.PruneError, match="every attention head"):
        shrink_heads(a, model, 0, [])


def test_removed_sublayers_and_blocks_equal_skipping_them(family, ids):
    model = tiny_model(family, layers=3)
    a = adapter_for(model)
    ref = copy.deepcopy(model)
    rb = a.blocks(ref)
    hooks = [
        a.attention(rb[0]).register_forward_hook(lambda m, i, o: (torch.zeros_like(o[0]), *o[1:])),
        (a.mlp_parent(rb[2]) if a.layout.mlp else a.mlp_parts(rb[2])[1]).register_forward_hook(lambda m, i, o: torch.zeros_like(o)),
        rb[1].register_forward_hook(lambda m, args, kwargs, o: args[0] if args else kwargs["hidden_states"], with_kwargs=True),
    ]
    remove_attention(a, model, 0)
    remove_mlp(a, model, 2)
    remove_blocks(a, model, [1])
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=ATOL)
    for h in hooks:
        h.remove()
    assert model.config.num_hidden_layers == 2 and len(a.blocks(model)) == 2
    assert [getattr(a.attention(b), "layer_idx", i) for i, b in enumerate(a.blocks(model))] == [0, 1]
    # generation with a KV cache (layer 0 has no attention: the cache length must still be right)
    prompt = ids[:1, :6]
    g1 = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=1)
    g2 = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=1)
    assert torch.equal(g1, g2)
    # incremental decoding by hand: positions come from the cache length, which layer 0 (no attention) must keep
    with torch.no_grad():
        first = model(input_ids=ids[:, :10], use_cache=True)
        assert first.past_key_values.get_seq_length() == 10
        step = model(input_ids=ids[:, 10:12], past_key_values=first.past_key_values, use_cache=True)
    assert torch.allclose(step.logits, logits(model, ids[:, :12])[:, 10:12], atol=ATOL)


# ------------------------------------------------------------------ 3. criteria
def test_fluctuation_statistics_match_a_direct_computation(ids):
    model = tiny_model("llama")
    a = adapter_for(model)
    seen = {}
    block = a.blocks(model)[1]
    h = a.mlp_parts(block)[1].register_forward_pre_hook(lambda m, i: seen.update(x=i[0].reshape(-1, i[0].shape[-1])))
    logits(model, ids)
    h.remove()
    stats = imp.collect_meanvar(a, model, ids, batch_size=len(ids))
    x = seen["x"].double()
    assert torch.allclose(stats[(1, "mlp")][0].double(), x.mean(0), atol=1e-5)
    assert torch.allclose(stats[(1, "mlp")][1].double(), x.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    scores = imp.fluctuation(a, model, stats)
    down = weight_matrix(a.mlp_parts(block)[1])
    assert torch.allclose(scores[1].mlp, stats[(1, "mlp")][1] * down.pow(2).sum(0), rtol=1e-5)


def test_taylor_and_magnitude_scores(ids):
    model = tiny_model("llama")
    a = adapter_for(model)
    mag = imp.magnitude(a, model)
    block = a.blocks(model)[0]
    gate, up = (weight_matrix(m) for m in a.mlp_parts(block)[0])
    down = weight_matrix(a.mlp_parts(block)[1])
    expect = gate[7].pow(2).sum() + up[7].pow(2).sum() + down[:, 7].pow(2).sum()
    assert torch.allclose(mag[0].mlp[7], expect, rtol=1e-5)
    # taylor: |w * dL/dw| with the gradient summed over sequences
    parts = [*a.mlp_parts(block)[0], a.mlp_parts(block)[1]]
    grads = imp.gradient_sums(model, ids, parts, batch_size=2)
    ref = copy.deepcopy(model)
    loss = sum(ref(input_ids=r[None], labels=r[None]).loss for r in ids)
    loss.backward()
    rb = a.blocks(ref)[0]
    assert torch.allclose(grads[id(parts[0].weight)], a.mlp_parts(rb)[0][0].weight.grad, rtol=1e-3, atol=1e-6)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ 4-8. whole runs
CRITERIA = ("magnitude", "fluctuation", "taylor", "random")


@pytest.mark.parametrize("criterion", CRITERIA)
def test_structured_prune_every_family(family, criterion, calib_ids, ids):
    model = tiny_model(family, layers=3)
    before = count_params(model)
    st = {"kinds": ["heads", "mlp"], "ratio": 0.5, "criterion": criterion}
    model, rep = prunekit.prune(model, {"structure": st}, calib_ids, progress=False)
    s = rep.summary
    assert s["params"] == count_params(model) == s["params_expected"] < before
    h, _kv, width = SIZES[family]
    for block in adapter_for(model).blocks(model):
        assert block_width(adapter_for(model), block) == width // 2
        assert block_heads(adapter_for(model), model, block)[0] == h // 2
    assert torch.isfinite(logits(model, ids)).all()
    # stock configs can say "fewer heads" only where head_dim is a config field
    assert s["format"] == ("stock" if family in ("llama", "qwen2", "mistral") else "prunekit")
    if s["format"] == "prunekit":
        assert s["format_reason"] == f"a stock {family} config derives head_dim from the number of heads"


def test_plan_removes_the_least_important_units(ids, calib_ids):
    model = tiny_model("llama")
    a = adapter_for(model)
    with torch.no_grad():  # channel 5 of layer 0 and kv group 1 of layer 1 made tiny: magnitude must take them
        for m in a.mlp_parts(a.blocks(model)[0])[0]:
            weight_matrix(m)[5] *= 1e-3
        weight_matrix(a.mlp_parts(a.blocks(model)[0])[1])[:, 5] *= 1e-3
        attn = a.attn_parts(a.blocks(model)[1])
        for r in ("q",):
            weight_matrix(attn[r])[2 * HD :] *= 1e-3
        for r in ("k", "v"):
            weight_matrix(attn[r])[HD:] *= 1e-3
        weight_matrix(attn["o"])[:, 2 * HD :] *= 1e-3
    m1 = copy.deepcopy(model)
    _, rep = prunekit.prune(m1, {"structure": {"kinds": ["mlp"], "ratio": 1 / 128, "criterion": "magnitude"}}, progress=False)
    assert rep.summary["mlp_removed"] == "2/256"
    m2 = copy.deepcopy(model)
    _, rep = prunekit.prune(m2, {"structure": {"kinds": ["heads"], "ratio": 0.5, "criterion": "magnitude", "gqa": "kv"}}, progress=False)
    assert rep.summary["plan"]["1"] == {"heads": [2, 3], "kv_heads": [1], "channels": 0}
    # equivalence end to end: the shrunk model equals the dense one with those o columns zeroed
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, p in rep.summary["plan"].items():
            _zero_heads(a, ref, int(layer), p["heads"])
    assert torch.allclose(logits(m2, ids), logits(ref, ids), atol=ATOL)


@pytest.mark.parametrize("gqa, ratio, heads_left", [("query", 0.5, 3), ("query", 0.2, 6), ("kv", 0.5, 6), ("kv", 0.2, 6)])
def test_ratio_is_the_share_of_attention_weights(gqa, ratio, heads_left):
    """SmolLM2's shape (9 query heads, 3 kv heads): a slice of 3 query heads is 3/12 of the attention weights,
    a kv group 4/12; ratio 0.5 removes 6/12 (two slices) or, of kv groups, 4/12 (1.5 groups, the tie goes down)."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.LlamaConfig(hidden_size=144, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=256)
    model = t.LlamaForCausalLM(cfg).eval()
    attn = sum(p.numel() for p in model.model.layers[0].self_attn.parameters())
    model, rep = prunekit.prune(model, {"structure": {"kinds": ["heads"], "ratio": ratio, "criterion": "magnitude", "gqa": gqa}},
                                progress=False)
    assert [s["heads"] for s in rep.layers.values()] == [heads_left] * 2
    left = sum(p.numel() for p in model.model.layers[0].self_attn.parameters())
    if (gqa, ratio) == ("query", 0.5):
        assert left == attn // 2 and rep.summary["format"] == "stock" and model.config.num_key_value_heads == 3


def test_global_rank_gives_per_layer_sizes_and_keeps_the_total(calib_ids):
    model = tiny_model("llama", layers=4)
    with torch.no_grad():  # make layer 2's MLP much less important than the others
        a = adapter_for(model)
        weight_matrix(a.mlp_parts(a.blocks(model)[2])[1]).mul_(0.01)
    model, rep = prunekit.prune(model, {"structure": {"kinds": ["mlp"], "ratio": 0.5, "criterion": "magnitude", "global_rank": True}}, progress=False)
    widths = [s["intermediate"] for s in rep.layers.values()]
    assert sum(widths) == 4 * 128 // 2 and len(set(widths)) > 1 and min(widths) >= 1
    assert rep.summary["format"] == "prunekit" and rep.summary["format_reason"] == "layer sizes differ"


def test_qwen2_and_mistral_biases_are_not_stock(calib_ids):
    for family in ("qwen2", "mistral"):
        st = {"kinds": ["mlp"], "ratio": 0.5, "criterion": "magnitude", "bias_compensation": True}
        _, rep = prunekit.prune(tiny_model(family), {"structure": st}, calib_ids, progress=False)
        assert rep.summary["format"] == "prunekit"
        assert rep.summary["format_reason"] == f"it has biases a stock {family} config cannot switch on"
        assert "mlp.down_proj" in rep.layers["model.layers.0"]["biases"]


def test_bias_compensation_adds_the_mean_and_helps(calib_ids):
    dense = tiny_model("llama", layers=2)
    st = {"kinds": ["heads", "mlp"], "ratio": 0.5, "criterion": "magnitude"}
    plain, _ = prunekit.prune(copy.deepcopy(dense), {"structure": st}, calib_ids, progress=False)
    comp, rep = prunekit.prune(copy.deepcopy(dense), {"structure": {**st, "bias_compensation": True}}, calib_ids, progress=False)
    ref = logits(dense, calib_ids)
    err_plain = (logits(plain, calib_ids) - ref).pow(2).mean()
    err_comp = (logits(comp, calib_ids) - ref).pow(2).mean()
    assert err_comp < err_plain
    # Llama: the attention_bias / mlp_bias flags describe the new biases, so the config stays stock
    assert rep.summary["format"] == "stock" and comp.config.attention_bias and comp.config.mlp_bias
    a = adapter_for(comp)
    assert all(m.bias is not None for b in a.blocks(comp) for m in a.attn_parts(b).values())
    assert rep.summary["params"] == rep.summary["params_expected"]


def test_bias_compensation_equals_zeroing_plus_mean_bias(calib_ids, ids):
    """With mean inputs known, compensation is exact arithmetic: zero the columns, add W[:, R] @ mean(x_R)."""
    model = tiny_model("qwen2")
    a = adapter_for(model)
    stats = imp.collect_meanvar(a, model, calib_ids)
    ref = copy.deepcopy(model)
    from prunekit.structure.compensate import compensate
    from prunekit.structure.plan import LayerPlan

    plan = {0: LayerPlan(heads=[1, 3], channels=[4, 9, 100]), 1: LayerPlan(channels=list(range(30)))}
    with torch.no_grad():
        for layer, lp in plan.items():
            rb = a.blocks(ref)[layer]
            for part, cols in ((o_proj(a, rb), [c for h in lp.heads for c in range(h * HD, (h + 1) * HD)]), (a.mlp_parts(rb)[1], lp.channels)):
                if not cols:
                    continue
                w = weight_matrix(part)
                mean = stats[(layer, "attn" if part is o_proj(a, rb) else "mlp")][0]
                if part.bias is None:
                    part.bias = torch.nn.Parameter(torch.zeros(w.shape[0]))
                part.bias += w[:, cols] @ mean[cols]
                w[:, cols] = 0
        compensate(a, model, plan, stats)
        shrink_heads(a, model, 0, [0, 2])
        shrink_mlp(a, model, 0, [c for c in range(128) if c not in plan[0].channels])
        shrink_mlp(a, model, 1, range(30, 128))
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=ATOL)


# ------------------------------------------------------------------ 5. depth
def test_block_influence_finds_an_identity_block(calib_ids, ids):
    model = tiny_model("llama", layers=4)
    a = adapter_for(model)
    with torch.no_grad():  # block 2 adds nothing: its output is its input
        weight_matrix(o_proj(a, a.blocks(model)[2])).zero_()
        weight_matrix(a.mlp_parts(a.blocks(model)[2])[1]).zero_()
    inf = influences(a, model, calib_ids, sublayers=True)
    assert inf["block"][2] < 1e-6 < min(inf["block"][i] for i in (0, 1, 3))
    assert inf["attn"][2] < 1e-6 and inf["mlp"][2] < 1e-6
    before = logits(model, ids)
    model, rep = prunekit.prune(model, {"structure": {"remove_layers": 1}}, calib_ids, progress=False)
    assert rep.summary["removed_layers"] == [2] and model.config.num_hidden_layers == 3
    assert torch.allclose(logits(model, ids), before, atol=ATOL)
    assert rep.summary["format"] == "stock" and rep.summary["params"] == rep.summary["params_expected"]


def test_greedy_sublayers_pick_a_silent_sublayer(calib_ids):
    model = tiny_model("llama", layers=3)
    a = adapter_for(model)
    with torch.no_grad():
        weight_matrix(a.mlp_parts(a.blocks(model)[1])[1]).zero_()  # MLP of block 1 contributes nothing
    chosen = greedy_sublayers(a, model, calib_ids, 2, samples=4)
    assert chosen[0] == (1, "mlp") and len(set(chosen)) == 2
    model, rep = prunekit.prune(model, {"structure": {"remove_sublayers": 1, "sublayer_method": "greedy"}}, calib_ids, progress=False)
    assert rep.summary["removed_sublayers"] == ["1.mlp"] and rep.summary["format"] == "prunekit"
    assert rep.summary["format_reason"] == "a sublayer is removed"


def test_sublayers_removed_in_both_halves_drop_the_block(calib_ids):
    model = tiny_model("llama", layers=3)
    a = adapter_for(model)
    with torch.no_grad():
        weight_matrix(o_proj(a, a.blocks(model)[0])).zero_()
        weight_matrix(a.mlp_parts(a.blocks(model)[0])[1]).zero_()
    model, rep = prunekit.prune(model, {"structure": {"remove_sublayers": 2}}, calib_ids, progress=False)
    assert rep.summary["removed_sublayers"] == ["0.attn", "0.mlp"] and rep.summary["removed_layers"] == [0]
    assert model.config.num_hidden_layers == 2 and rep.summary["format"] == "stock"


# ------------------------------------------------------------------ 6. save and reload
@pytest.mark.parametrize("structure", [
    {"kinds": ["heads", "mlp"], "ratio": 0.5, "criterion": "magnitude"},
    {"kinds": ["mlp"], "ratio": 0.25, "criterion": "magnitude"},
    {"kinds": ["heads", "mlp"], "ratio": 0.3, "criterion": "magnitude", "global_rank": True, "bias_compensation": True},
    {"remove_layers": 1},
    {"remove_sublayers": 1},
])
def test_saved_model_reloads(family, structure, tmp_path, calib_ids, ids):
    model = tiny_model(family, layers=3)
    if structure.get("global_rank"):
        with torch.no_grad():  # make the per-layer sizes differ for sure
            a = adapter_for(model)
            weight_matrix(a.mlp_parts(a.blocks(model)[1])[1]).mul_(0.01)
    model, rep = prunekit.prune(model, {"structure": structure}, calib_ids, progress=False)
    out = prunekit.save(model, byte_tokenizer(), tmp_path / "m", rep.to_dict())
    want = logits(model, ids)
    again, _, man = prunekit.load(out)
    assert torch.allclose(logits(again, ids), want, atol=ATOL)
    assert count_params(again) == rep.summary["params"] and man["summary"]["format"] == rep.summary["format"]
    if rep.summary["format"] == "stock":
        stock = AutoModelForCausalLM.from_pretrained(out)
        assert torch.allclose(logits(stock, ids), want, atol=ATOL)
        assert "prunekit_layer_sizes" not in (out / "config.json").read_text()
    else:
        assert "prunekit_layer_sizes" in (out / "config.json").read_text()
        with pytest.raises(Exception):  # noqa: B017 - stock transformers must not silently load other shapes
            AutoModelForCausalLM.from_pretrained(out)
    # uniform MLP pruning and layer removal are stock for every family
    if structure.get("kinds") == ["mlp"] or "remove_layers" in structure:
        assert rep.summary["format"] == "stock"


def test_non_uniform_shrink_by_hand_rebuilds(tmp_path, ids):
    model = tiny_model("llama", layers=3)
    a = adapter_for(model)
    with torch.no_grad():
        shrink_heads(a, model, 0, [1, 3])  # 2 query heads, 2 kv groups
        shrink_heads(a, model, 1, [0, 1])  # 2 query heads, 1 kv group
        shrink_mlp(a, model, 2, range(17))
    assert finalize_config(a, model) == "prunekit"
    out = prunekit.save(model, byte_tokenizer(), tmp_path / "m")
    again, _, _ = prunekit.load(out)
    assert torch.allclose(logits(again, ids), logits(model, ids), atol=ATOL)
    assert [block_heads(a, again, b) for b in a.blocks(again)] == [(2, 2), (2, 1), (4, 2)]


# ------------------------------------------------------------------ 7. bad requests
@pytest.mark.parametrize("structure, phrase", [
    ({"kinds": ["heads"], "ratio": 0.9}, "removes every attention head"),
    ({"kinds": ["mlp"], "ratio": 0.999}, "removes every MLP channel"),
    ({"kinds": ["heads"], "ratio": 0.1}, "removes no attention head"),  # GQA: a slice of 2 query heads is 1/3
    ({"remove_layers": 2}, "not less than the model's 2 layers"),
    ({"remove_sublayers": 4}, "not less than the model's 4"),
])
def test_impossible_requests_fail_before_any_change(structure, phrase, calib_ids):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.PruneError, match=phrase):
        prunekit.prune(model, {"structure": structure}, calib_ids, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("fields, phrase", [
    ({"structure": {"kinds": ["heads"]}}, "needs a sparsity"),
    ({"structure": {"ratio": 0.3}}, "sparsity needs kinds"),
    ({"structure": {"kinds": ["heads"], "ratio": 1.0}}, "sparsity must be in [0, 1)"),
    ({"structure": {"kinds": ["rows"], "ratio": 0.3}}, "structure.kinds"),
    ({"structure": {"kinds": ["mlp"], "ratio": 0.3}, "sparsity": 0.6}, "replaces sparsity pruning"),
    ({"structure": {"remove_layers": 1, "remove_sublayers": 1}}, "not both"),
    ({"structure": {}}, "nothing to remove"),
    ({"structure": {"kinds": ["hidden"], "ratio": 0.25, "global_rank": True}}, "global_rank ranks heads or MLP"),
    ({"structure": {"kinds": ["hidden"], "ratio": 0.25, "bias_compensation": True}}, "bias_compensation needs"),
])
def test_recipe_structure_section_is_validated(fields, phrase):
    with pytest.raises(prunekit.PruneError, match=phrase.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        prunekit.Recipe.make(**fields)


def test_saved_structured_recipe_reads_back():
    rec = prunekit.Recipe.make(structure={"kinds": ["heads"], "ratio": 0.3, "gqa": "kv"})
    again = prunekit.Recipe.make(**rec.model_dump())  # a manifest repeats every default: still valid
    assert again.structure == rec.structure and again.needs_data
    assert not prunekit.Recipe.make(structure={"kinds": ["mlp"], "ratio": 0.3, "criterion": "magnitude"}).needs_data
    assert prunekit.Recipe.make().structure is None and prunekit.Recipe.make().needs_data


def test_post_norm_opt_refuses_sublayers(calib_ids):
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    with pytest.raises(prunekit.PruneError, match="post-norm"):
        prunekit.prune(model, {"structure": {"remove_sublayers": 1}}, calib_ids, progress=False)


def test_every_family_fixture_is_covered():
    assert set(SIZES) == set(FAMILIES)
