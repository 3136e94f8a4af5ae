"""Recovery data selection (prunekit.train.select): all, random, PASER (clusters, budgets by the pruned model's
divergence from the dense one, near duplicates skipped)."""

import copy
import json
import math

import numpy as np
import pytest
import torch

import prunekit
from prunekit.train import recover
from prunekit.train.select import degradation, jsd, paser_plan, select_windows
from prunekit.recipe import Recovery
from tests.conftest import byte_tokenizer, invoke, tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ids():
    """24 windows of 32 bytes of the Python reference manual (distinct real text)."""
    import pydoc_data.topics as t

    tokens = prunekit.tokenize(byte_tokenizer(), "\n".join(list(t.topics.values())[:30]))
    return tokens[: 24 * 32].view(24, 32).clone()


@pytest.fixture(scope="module")
def pair(ids):
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, ids[:8], progress=False)
    return dense, model


def _spread(n, d=64, seed=0):
    """``n`` random unit vectors in ``d`` dimensions: pairwise cosines far below 0.95."""
    z = np.random.default_rng(seed).normal(size=(n, d))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


# ---- the plan: budgets and order ----

def test_budgets_are_proportional_to_mean_degradation():
    # three clusters of 10 with mean degradation 0.5 / 0.3 / 0.2: 10 windows split 5 / 3 / 2
    means = [0.5, 0.3, 0.2]
    labels = np.repeat([0, 1, 2], 10)
    rng = np.random.default_rng(0)
    deg = np.concatenate([m + rng.uniform(-0.05, 0.05, 10) for m in means])
    for c, m in enumerate(means):  # exact cluster means
        deg[labels == c] += m - deg[labels == c].mean()
    chosen, plan = paser_plan(deg, labels, 10, _spread(30), 0.95)
    assert [c["budget"] for c in plan["per_cluster"]] == [5, 3, 2]
    assert [c["selected"] for c in plan["per_cluster"]] == [5, 3, 2] and len(chosen) == 10
    for c, row in enumerate(plan["per_cluster"]):  # inside a cluster: the most degraded, in order
        members = np.flatnonzero(labels == c)
        top = members[np.argsort(-deg[members])[: row["budget"]]]
        assert set(chosen) & set(members) == set(top)
        assert math.isclose(row["degradation"], means[c], abs_tol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_budgets_sum_follow_ranking_and_caps(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    sizes = rng.integers(1, 12, size=k)
    labels = np.repeat(np.arange(k), sizes)
    n = len(labels)
    deg = rng.uniform(0.01, 0.6, size=n)
    m = int(rng.integers(1, n + 1))
    chosen, plan = paser_plan(deg, labels, m, _spread(n, seed=seed), 0.95)
    rows = plan["per_cluster"]
    budget = np.array([r["budget"] for r in rows])
    mean = np.array([deg[labels == c].mean() for c in range(k)])
    assert len(chosen) == m == budget.sum() and len(set(chosen)) == m
    assert (budget <= sizes).all()
    # no cluster below its proportional integer share (capped by its size)
    floor_share = np.floor(m * mean / mean.sum()).astype(int)
    assert (budget >= np.minimum(sizes, floor_share)).all()
    # more degradation never a smaller budget, unless the cluster is full
    for a in range(k):
        for b in range(k):
            if mean[a] > mean[b]:
                assert budget[a] >= budget[b] or budget[a] == sizes[a]
    # inside each cluster the top-degraded window is picked first
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if budget[c]:
            assert members[np.argmax(deg[members])] in chosen


def test_a_full_cluster_hands_its_surplus_on():
    labels = np.array([0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    deg = np.array([0.9] + [0.3] * 6 + [0.1] * 6)
    chosen, plan = paser_plan(deg, labels, 6, _spread(13), 0.95)
    budgets = [r["budget"] for r in plan["per_cluster"]]
    assert budgets[0] == 1 and sum(budgets) == 6 and budgets[1] > budgets[2] and 0 in chosen
    # the surplus of the full cluster is shared by the others: each at least its floor share of the 5 left
    assert budgets[1] >= math.floor(5 * 0.3 / 0.4) and budgets[2] >= math.floor(5 * 0.1 / 0.4)


def test_near_duplicate_filter_drops_an_exact_duplicate():
    z = _spread(8)
    z[1] = z[0]  # window 1 is window 0 again
    labels = np.zeros(8, dtype=int)
    deg = np.array([0.9, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    chosen, plan = paser_plan(deg, labels, 3, z, 0.95)
    assert list(chosen) == [0, 2, 3] and plan["near_duplicates_skipped"] == 1
    # with the filter off (threshold above any cosine) the duplicate is taken
    assert list(paser_plan(deg, labels, 3, z, 1.0 + 1e-6)[0]) == [0, 1, 2]
    # only duplicates left: taken last so the count stays exact
    z2 = np.repeat(z[:1], 4, 0)
    chosen, plan = paser_plan(np.array([0.4, 0.3, 0.2, 0.1]), np.zeros(4, int), 3, z2, 0.95)
    assert list(chosen) == [0, 1, 2] and plan["near_duplicates_taken"] == 2


# ---- degradation: Jensen-Shannon divergence per window ----

def test_jsd_matches_the_entropy_form_and_bounds():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    p, q = a.softmax(-1).double(), b.softmax(-1).double()

    def h(x):
        return -(x * x.log()).sum(-1)

    want = h((p + q) / 2) - (h(p) + h(q)) / 2
    assert torch.allclose(jsd(a, b).double(), want, atol=1e-5)
    assert torch.allclose(jsd(a, a), torch.zeros(5), atol=1e-6)
    assert torch.allclose(jsd(a, b), jsd(b, a), atol=1e-6) and bool((jsd(a, b) <= math.log(2) + 1e-6).all())


def test_degradation_is_zero_for_the_dense_model_and_per_window(pair, ids):
    dense, model = pair
    same = degradation(dense, copy.deepcopy(dense), ids[:6], 4, progress=False)
    assert torch.allclose(same, torch.zeros(6, dtype=torch.float64), atol=1e-6)
    d = degradation(model, dense, ids[:6], 4, progress=False)
    with torch.no_grad():
        one = jsd(dense(input_ids=ids[2:3]).logits[0], model(input_ids=ids[2:3]).logits[0]).mean()
    assert bool((d > 0).all()) and math.isclose(float(d[2]), float(one), rel_tol=1e-4)
    assert not model.training and not dense.training


# ---- select_windows and recover ----

def test_keep_one_selects_everything_and_random_is_seeded(pair, ids):
    dense, model = pair
    n = ids.shape[0]
    for select in ("all", "random", "paser"):
        s = select_windows(model, Recovery(select=select, keep=1.0), ids, teacher=dense, tokenizer=byte_tokenizer(),
                           progress=False)
        assert s.indices.tolist() == list(range(n)) and s.info["selected"] == n
    a = select_windows(model, Recovery(select="random", keep=0.25, seed=3), ids).indices
    b = select_windows(model, Recovery(select="random", keep=0.25, seed=3), ids).indices
    c = select_windows(model, Recovery(select="random", keep=0.25, seed=4), ids).indices
    assert torch.equal(a, b) and not torch.equal(a, c) and len(a) == round(0.25 * n) == 6
    assert a.tolist() == sorted(set(a.tolist()))


def test_recover_trains_on_exactly_the_selected_windows(ids):
    fast = {"steps": 3, "lr": 3e-3, "lora_rank": 4, "seed": 1}
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, ids[:8], progress=False)
    twin = copy.deepcopy(model)
    _, stats = recover(model, {**fast, "select": "random", "keep": 0.25}, ids, progress=False)
    sel = stats["selection"]
    rows = select_windows(twin, Recovery(**fast, select="random", keep=0.25), ids).indices
    _, stats2 = recover(twin, fast, ids[rows], progress=False)
    assert stats["steps"] == stats2["steps"] == 3 and sel["selected"] == 6 and stats2["selection"]["selected"] == 6
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), n


def test_paser_with_minilm_end_to_end(pair, ids):
    """The real path: decoded windows embedded by MiniLM, clustered, divergence measured, budgets, duplicates."""
    dense, model = pair
    windows = torch.cat([ids[:12], ids[:1].repeat(6, 1)])  # 6 more copies of window 0
    n = windows.shape[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = Recovery(select="paser", keep=0.5, clusters=3)
    s = select_windows(model, rec, windows, teacher=dense, tokenizer=byte_tokenizer(), progress=False)
    info = s.info
    assert len(s.indices) == info["selected"] == 9 and sum(r["budget"] for r in info["per_cluster"]) == 9
    assert sum(r["size"] for r in info["per_cluster"]) == n and len(info["per_cluster"]) == 3
    assert sum(1 for i in s.indices.tolist() if i == 0 or i >= 12) <= 1  # at most one copy of the repeated window
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # selection changes nothing
    deg = degradation(model, dense, windows, 4, progress=False).numpy()
    assert math.isclose(info["degradation_selected_mean"], float(deg[s.indices.numpy()].mean()), rel_tol=1e-4)
    json.dumps(info)  # recordable as is


def test_paser_needs_teacher_and_tokenizer(pair, ids):
    dense, model = pair
    m2 = copy.deepcopy(model)
    with pytest.raises(prunekit.PruneError, match="pass the dense model as teacher"):
        recover(m2, {"steps": 2, "select": "paser", "keep": 0.5}, ids, progress=False)
    with pytest.raises(prunekit.PruneError, match="pass tokenizer="):
        recover(m2, {"steps": 2, "select": "paser", "keep": 0.5}, ids, teacher=dense, progress=False)
    with pytest.raises(prunekit.PruneError, match="only used by recovery method 'distill' and by select 'paser'"):
        recover(m2, {"steps": 2, "select": "random", "keep": 0.5}, ids, teacher=dense, progress=False)


@pytest.mark.parametrize("fields, phrase", [
    ({"keep": 0.0}, "Invalid recovery keep: must be in (0, 1]"),
    ({"keep": 1.2, "select": "random"}, "Invalid recovery keep: must be in (0, 1]"),
    ({"keep": 0.2}, "keep 0.2 needs select random or paser"),
    ({"select": "best"}, "Unknown recovery selection 'best'"),
    ({"select": "paser", "dedup_threshold": 0}, "Invalid recovery dedup_threshold"),
])
def test_bad_selection_is_one_sentence(fields, phrase):
    with pytest.raises(prunekit.PruneError, match=phrase.replace("(", r"\(").replace("]", r"\]")) as e:
        Recovery.make(**fields)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_prune_api_records_the_selection(ids):
    """prunekit.prune with a recovery section select paser: the dense copy is taken before pruning, the tokenizer
    decodes the recovery windows, the selection is recorded in summary.recovery."""
    recipe = {"method": "wanda", "sparsity": 0.5,
              "recovery": {"steps": 2, "select": "paser", "keep": 0.5, "clusters": 2, "lora_rank": 4}}
    _, rep = prunekit.prune(tiny_model("llama"), recipe, ids[:4], tokenizer=byte_tokenizer(), recovery_batches=ids[:12],
                            progress=False)
    sel = rep.summary["recovery"]["selection"]
    assert sel["select"] == "paser" and sel["selected"] == 6 and sel["candidates"] == 12
    assert sum(r["budget"] for r in sel["per_cluster"]) == 6 and rep.recipe["recovery"]["select"] == "paser"
    assert sel["degradation_selected_mean"] > 0  # measured against the dense copy, not the pruned model itself
    with pytest.raises(prunekit.PruneError, match="pass tokenizer="):
        prunekit.prune(tiny_model("llama"), recipe, ids[:4], recovery_batches=ids[:12], progress=False)


# ---- command line ----

@pytest.fixture
def pruned_dir(tiny_dir, tmp_path):
    d, text = tiny_dir
    model, tok, _ = prunekit.load(d)
    cal = prunekit.calibration_batches(prunekit.tokenize(tok, prunekit.load_text(str(text), "calibration")), 8, 32)
    _, rep = prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, cal, progress=False)
    out = tmp_path / "pruned"
    prunekit.save(model, tok, out, {**rep.to_dict(), "source": str(d)})
    return out, text


@pytest.mark.parametrize("args, phrase", [
    (["--select", "paser", "--keep", "0"], "Invalid recovery keep"),
    (["--select", "random", "--keep", "1.5"], "Invalid recovery keep"),
    (["--keep", "0.2"], "needs select random or paser"),
    (["--select", "paser", "--keep", "0.2", "--dedup-threshold", "2"], "Invalid recovery dedup_threshold"),
    (["--select", "random", "--keep", "0.2", "--teacher", "x/y"], "only used by --method distill or --select paser"),
])
def test_cli_bad_selection_exit_2_nothing_written(pruned_dir, tmp_path, args, phrase):
    src, text = pruned_dir
    out = tmp_path / "out"
    code, _, err = invoke("recover", src, "--text", text, "--seqlen", "32", "--steps", "2", "--out", out, *args)
    assert code == 2 and phrase in err and "Traceback" not in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_paser_records_the_selection(pruned_dir, tmp_path):
    src, text = pruned_dir
    out = tmp_path / "rec"
    code, stdout, err = invoke("recover", src, "--text", text, "--seqlen", "32", "--samples", "12", "--steps", "2",
                               "--lora-rank", "4", "--select", "paser", "--keep", "0.5", "--clusters", "2",
                               "--eval-windows", "2", "--ood-text", "none", "--quiet", "--out", out)
    assert code == 0, err
    sel = json.loads((out / "prunekit.json").read_text())["recovery"]["stats"]["selection"]
    assert sel["selected"] == 6 and sel["candidates"] == 12 and len(sel["per_cluster"]) == 2
    assert "selection paser: 6 of 12 windows" in stdout
