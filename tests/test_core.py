"""The one core: keep masks with exact counts, the one rounding helper, the one allocator, Masks across families."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.core.allocate import allocate_masks, keep_counts
from prunekit.core.masks import Masks, apportion, keep_highest, keep_n_of_m, keep_per_row, kept_total
from prunekit.errors import PruneError
from tests.legacy import allocation as old


def test_keep_highest_exact_with_ties():
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.5])
    keep = keep_highest(flat, 3)
    assert int(keep.sum()) == 3 and keep[4] and not keep[5]
    assert keep.tolist() == [False, False, True, True, True, False]  # ties: earlier positions removed first
    assert torch.equal(keep_highest(flat, 3), keep_highest(flat, 3))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_per_row_and_per_layer_counts(sparsity):
    s = torch.randn(7, 40).round()  # many ties
    keep = keep_per_row(s, s.numel() - int(40 * sparsity) * 7)
    assert ((~keep).sum(1) == int(40 * sparsity)).all()
    for i in range(7):
        if keep[i].any() and (~keep[i]).any():
            assert s[i][~keep[i]].max() <= s[i][keep[i]].min()
    layer = keep_highest(s, s.numel() - int(s.numel() * sparsity))
    assert int((~layer).sum()) == int(s.numel() * sparsity)


def test_per_row_spreads_a_remainder():
    s = torch.randn(4, 10)
    keep = keep_per_row(s, 40 - 14)  # 14 removed over 4 rows: two rows lose 4, two rows lose 3
    assert (~keep).sum(1).tolist() == [4, 4, 3, 3]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (3, 4)])
def test_n_of_m_exact(n, m):
    s = torch.randn(5, 12 * m)
    keep = keep_n_of_m(s, n, m)
    groups = (~keep).view(5, -1, m)
    assert (groups.sum(-1) == n).all()
    sg = s.view(5, -1, m)
    assert (sg.masked_fill(~groups, -1e9).amax(-1) <= sg.masked_fill(groups, 1e9).amin(-1)).all()


def test_masks_match_the_old_llm_selection_without_ties():
    s = torch.randn(16, 64)
    assert torch.equal(~keep_per_row(s, s.numel() - 300), old.per_row(s, 300))
    assert torch.equal(~keep_highest(s, s.numel() - 500), old.per_layer(s, 500))
    assert torch.equal(~keep_n_of_m(s, 2, 4), old.n_of_m(s, 2, 4))


def test_apportion_is_exact():
    assert apportion(10, [5, 5, 5], [5, 5, 5]) == [4, 3, 3]  # ties: the earlier part first
    assert sum(apportion(12345, [100, 5000, 7000, 300], [100, 5000, 7000, 300])) == 12345
    assert apportion(5, [2, 2], [2, 2]) == [2, 2]  # never above a cap
    assert apportion(10, [1, 1, 8], [2, 100, 100]) == [1, 1, 8]
    assert apportion(10, [9, 1], [3, 100]) == [3, 7]  # what a capped share cannot take goes to the others
    for sizes in ([7, 13, 29], [100, 5000, 7000, 300], [3, 3, 3, 3]):
        for c in (0, 1, sum(sizes) // 3, sum(sizes)):
            assert apportion(c, sizes, sizes) == old.split_count(c, sizes)


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(64, 32, generator=g), "b": torch.rand(16, 72, generator=g) * 0.01,
            "c": torch.rand(10, 64, generator=g) * 0.5, "d": torch.rand(48, 48, generator=g) * 2}


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_allocator_equals_the_old_llm_paths(sparsity):
    """Where the old LLM rule (prune int(s * N)) and the new one (keep round((1 - s) * N)) agree on the total."""
    scores = _layers()
    names = list(scores)
    numels = [scores[k].numel() for k in names]
    assert int(sum(numels) * sparsity) == sum(numels) - kept_total(sum(numels), sparsity)
    removed = lambda keep: [scores[k].numel() - keep[k] for k in names]  # noqa: E731
    assert removed(keep_counts(scores, sparsity, "uniform", slack="removed")) == old.uniform(numels, sparsity)
    for md in (0.0, 0.2):
        got = removed(keep_counts(scores, sparsity, "global", min_density=md))
        assert got == old.global_threshold([scores[k] for k in names], sparsity, md)
    # OWL over decoder blocks of equal size (as in every LLM: the old rounding assumed it)
    g = torch.Generator().manual_seed(3)
    blocks = {f"{b}.{k}": torch.rand(*shape, generator=g) * (1 + 9 * (b == 1 and k == "q"))
              for b in range(3) for k, shape in (("q", (32, 32)), ("up", (64, 32)))}
    groups = {name: int(name.split(".")[0]) for name in blocks}
    names_b = list(blocks)
    keep = keep_counts(blocks, sparsity, "owl", groups=groups, owl_m=1.5, owl_lambda=0.1, slack="removed")
    block_imp = [torch.cat([blocks[n].flatten() for n in names_b if groups[n] == b]) for b in range(3)]
    bs = old.owl_block_sparsity(block_imp, sparsity, 1.5, 0.1)
    expected = old.from_block_sparsity([blocks[n].numel() for n in names_b], [groups[n] for n in names_b], bs, sparsity)
    assert [blocks[n].numel() - keep[n] for n in names_b] == expected


@pytest.mark.parametrize("kind", ["uniform", "global", "global-min", "lamp", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_allocator_equals_the_old_vision_paths(kind, sparsity):
    scores = {f"{k}.weight": v for k, v in _layers(1).items()}
    md = 0.015 if kind == "global-min" else None
    before = old.allocate(scores, sparsity, kind, md)
    now = allocate_masks(scores, sparsity, "global" if kind == "global-min" else kind, min_density=md or 0.0)
    for k in scores:
        assert int(now[k].sum()) == int(before[k].sum()), (kind, k)
        assert torch.equal(now[k], before[k]), (kind, k)


@pytest.mark.parametrize("sparsity", [0.5, 0.625, 0.7])
def test_llm_owl_equals_the_old_path_with_equal_sized_layers(sparsity):
    """Decoder blocks have equal-sized layers (q/o, k/v, gate/up): equal remainders, where the LLM rule (the
    removed total shared by removal targets, the earlier layer loses the extra weight) must stay as it was."""
    g = torch.Generator().manual_seed(0)
    shapes = (("q", (32, 32)), ("k", (8, 32)), ("v", (8, 32)), ("o", (32, 32)), ("gate", (48, 32)), ("up", (48, 32)))
    blocks = {f"{b}.{k}": torch.rand(*s, generator=g) ** (1 + b % 4) for b in range(8) for k, s in shapes}
    groups = {n: int(n.split(".")[0]) for n in blocks}
    names = list(blocks)
    n = sum(t.numel() for t in blocks.values())
    assert int(n * sparsity) == n - kept_total(n, sparsity)  # the totals agree (else the rules differ on purpose)
    keep = keep_counts(blocks, sparsity, "owl", groups=groups, owl_m=2.0, owl_lambda=0.08, slack="removed")
    imp = [torch.cat([blocks[n].flatten() for n in names if groups[n] == b]) for b in range(8)]
    bs = old.owl_block_sparsity(imp, sparsity, 2.0, 0.08)
    expected = old.from_block_sparsity([blocks[n].numel() for n in names], [groups[n] for n in names], bs, sparsity)
    assert [blocks[n].numel() - keep[n] for n in names] == expected
    assert sum(keep.values()) == sum(t.numel() for t in blocks.values()) - sum(expected)


@pytest.mark.parametrize("kind", ["uniform", "erk"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.98])
def test_allocator_equals_the_old_vision_path_on_the_benchmark_cnn(kind, sparsity):
    """SmallCNN width 8 (the vision benchmark's model): layer targets with fractional parts where rescaling the
    rounded total to the layers (instead of rounding each layer's own target) moved one weight between layers."""
    from prunekit.vision.models import SmallCNN

    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in SmallCNN(10, 8).named_parameters() if p.dim() > 1}
    before = old.allocate(scores, sparsity, kind, None)
    now = allocate_masks(scores, sparsity, kind)
    assert [int(now[k].sum()) for k in scores] == [int(before[k].sum()) for k in scores]


def test_every_kind_keeps_exactly_the_target():
    scores = _layers(2)
    n = sum(s.numel() for s in scores.values())
    for kind in ("uniform", "global", "owl", "lamp", "erk"):
        for s in (0.3, 0.9, 0.99):
            assert sum(keep_counts(scores, s, kind).values()) == kept_total(n, s), kind
    with pytest.raises(PruneError, match="above the target density"):
        keep_counts(scores, 0.9, "global", min_density=0.2)
    with pytest.raises(PruneError, match="Unknown allocation"):
        keep_counts(scores, 0.5, "bogus")


def test_llm_gains_lamp_and_erk(calib_ids):
    from tests.conftest import tiny_model

    for kind in ("lamp", "erk"):
        m = tiny_model("llama", layers=3)
        _, rep = prunekit.prune(m, {"method": "wanda", "sparsity": 0.6, "allocation": {"kind": kind}}, calib_ids, progress=False)
        s = rep.summary
        assert s["target_zeros"] == s["target_params"] - kept_total(s["target_params"], 0.6)
        assert len({round(v["sparsity"], 3) for v in rep.layers.values()}) > 1  # not uniform


def test_vision_gains_owl():
    from prunekit.vision.models import SmallCNN
    from prunekit.vision.schedules import compute_masks

    model = SmallCNN(10, 8)
    masks = compute_masks(model, 0.8, "magnitude", "owl")
    assert masks.kept() == kept_total(masks.numel(), 0.8)
    assert len({round(v, 3) for v in masks.layer_density().values()}) > 1


def test_masks_round_trip_between_families(tmp_path):
    """A keep mask made by the vision side, used by LLM recovery, keeps exactly the same zeros (True = kept
    everywhere)."""
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    names = [n for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    scores = {n: dict(model.named_parameters())[n].detach().abs() for n in names}
    masks = allocate_masks(scores, 0.6, "global")  # the vision/generic path
    masks.apply(model)
    assert Masks.from_zeros(model, names).masks.keys() == masks.masks.keys()
    assert all(torch.equal(Masks.from_zeros(model, names)[n], masks[n]) for n in names)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    prunekit.recover(model, {"method": "full", "steps": 3, "lr": 1e-2, "batch_size": 2}, ids, progress=False)
    after = Masks.from_zeros(model, names)
    for n in names:
        assert torch.equal(after[n] | masks[n], masks[n]), n  # every removed weight is still zero
    assert Masks.from_state(masks.state()).masks.keys() == masks.masks.keys()


def test_attach_enforces_masks_in_a_plain_loop():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    masks = allocate_masks({k: p.detach().abs() for k, p in net.named_parameters() if k.endswith("weight")}, 0.5, "uniform")
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    masks.attach(net, opt)
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(4, 8)).sum().backward()
        opt.step()
    for k, m in masks.items():
        assert (dict(net.named_parameters())[k][~m] == 0).all()
    masks.detach()
    assert masks.stats()["sparsity"] == pytest.approx(0.5)


def test_api_prune_runs_the_recipe_recovery_section():
    from tests.conftest import bos_tokenizer, tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    recipe = {"method": "wanda", "sparsity": 0.5, "recovery": {"method": "full", "steps": 3, "lr": 1e-3, "batch_size": 2}}
    with pytest.raises(PruneError, match="recovery section"):
        prunekit.prune(tiny_model("llama"), recipe, ids, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, rep = prunekit.prune(model, recipe, ids, recovery_batches=ids, progress=False)
    assert rep.summary["recovery"]["steps"] == 3 and rep.times["recovery_s"] > 0
    assert rep.summary["target_sparsity"] == pytest.approx(0.5)
    moved = [k for k, v in model.state_dict().items() if ".layers." in k and not torch.equal(v, before[k])]
    assert moved  # trained
    # given token ids, the recorded calibration says so (no text), with their real shape
    assert rep.recipe["calibration"]["text"] is None and rep.recipe["calibration"]["samples"] == 8
    # with a tokenizer the windows are drawn from the recipe's texts
    import pydoc_data.topics  # noqa: F401

    _, rep2 = prunekit.prune(tiny_model("llama"), {"method": "wanda", "calibration": {"text": "pydoc", "samples": 4, "seqlen": 16}},
                             tokenizer=bos_tokenizer(), progress=False)
    assert rep2.recipe["calibration"]["text"] == "pydoc" and rep2.recipe["calibration"]["bos"] is True


@pytest.mark.parametrize("old,new", [({"blocksize": 64}, ("options", "blocksize", 64)),
                                     ({"structure": {"kinds": ["mlp"], "ratio": 0.25}}, ("structure", "sparsity", 0.25))])
def test_deprecated_recipe_keys_still_run_and_warn(old, new, calib_ids):
    from tests.conftest import tiny_model

    fields = {"method": "sparsegpt", **old} if "blocksize" in old else old
    with pytest.warns(FutureWarning, match="next release"):
        r = prunekit.Recipe.make(**fields)
    section, key, value = new
    assert (r.options if section == "options" else r.structure.model_dump())[key] == value
    with pytest.warns(FutureWarning):
        _, rep = prunekit.prune(tiny_model("llama"), fields, calib_ids, progress=False)
    assert rep.recipe[section][key] == value


def test_vision_deprecated_spellings_still_run_and_warn():
    from prunekit.vision.train import make_config

    with pytest.warns(FutureWarning):
        cfg = make_config(method="snip", allocation="global-min", min_density=0.01, sparsity=0.9)
    assert cfg.criterion == "snip" and cfg.allocation == "global" and cfg.min_density == 0.01


def test_registries_give_the_choices():
    from prunekit.core.allocate import ALLOCATIONS
    from prunekit.data.scores import SCORES
    from prunekit.data.select import STRATEGIES
    from prunekit.methods import METHODS
    from prunekit.structure.importance import CRITERIA as STRUCTURED
    from prunekit.train.recovery import RECOVERY_METHODS
    from prunekit.vision.channels import CHANNEL_CRITERIA
    from prunekit.vision.criteria import CRITERIA
    from prunekit.vision.schedules import SCHEDULES

    for reg, some in ((METHODS, "sparsegpt"), (ALLOCATIONS, "owl"), (SCORES, "el2n"), (STRATEGIES, "ccs"),
                      (STRUCTURED, "fluctuation"), (RECOVERY_METHODS, "perp"), (CHANNEL_CRITERIA, "bn-scale"),
                      (CRITERIA, "synflow"), (SCHEDULES, "lottery")):
        assert some in reg
        with pytest.raises(PruneError, match=f"choose one of: .*{some}"):
            reg.canonical("no-such-thing")
    with pytest.raises(PruneError, match="Unknown method 'x'; choose one of: magnitude, wanda, sparsegpt, gblm"):
        prunekit.Recipe.make(method="x")


@pytest.mark.parametrize("keep", [0, 1, 37, 500, 1199])
def test_row_selection_in_chunks_equals_one_pass(monkeypatch, keep):
    """keep_per_row / keep_n_of_m sort a few rows at a time (bounded memory); the masks equal one whole sort,
    ties and the uneven first rows included."""
    from prunekit.core import masks as M

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (30, 40), generator=g).float()  # many ties
    monkeypatch.setattr(M, "_CHUNK", 1 << 30)
    whole, nm = M.keep_per_row(scores, keep), M.keep_n_of_m(scores, 2, 4)
    monkeypatch.setattr(M, "_CHUNK", 7 * 40)  # 7 rows per chunk: the last chunk is short
    assert torch.equal(M.keep_per_row(scores, keep), whole)
    assert torch.equal(M.keep_n_of_m(scores, 2, 4), nm)
    assert int(whole.sum()) == keep


def _per_row_by_sort(scores, keep):
    """The definition: per row, stable-sort and remove the lowest (the first ``extra`` rows one more)."""
    rows, _ = scores.shape
    base, extra = divmod(scores.numel() - keep, rows)
    mask = torch.ones_like(scores, dtype=torch.bool)
    for r in range(rows):
        n = base + (1 if r < extra else 0)
        mask[r, scores[r].argsort(stable=True)[:n]] = False
    return mask


@pytest.mark.parametrize("ties", [False, True])
def test_keep_per_row_selection_equals_a_stable_sort(ties):
    g = torch.Generator().manual_seed(7)
    for rows, cols in ((5, 9), (13, 4), (1, 17), (32, 64)):
        s = torch.randn(rows, cols, generator=g)
        if ties:
            s = (s * 2).round()
        for keep in {0, 1, rows - 1, rows * cols // 2, rows * cols // 2 + 3, rows * cols - 1, rows * cols}:
            if keep < 0:
                continue
            assert torch.equal(keep_per_row(s, keep), _per_row_by_sort(s, keep)), (rows, cols, keep)
