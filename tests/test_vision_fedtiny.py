"""Learner ``fedtiny`` (Huang et al. 2023) on Flower: one client equals central training on its data for the same
steps (dense FedAvg and masked rounds after pruning), the non-IID split, the sparse records and their bytes, the
server's prune-and-grow by hand, the sparsity held at the target through the rounds, and a CLI run that loads back
with option mistakes as one sentence and exit 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunekit.errors import PruneError
from prunekit.vision.learn.fedtiny import (FedTinyOptions, client_seed, client_shards, dirichlet_split, masks_of,
                                           pack, payload_bytes, prune_and_grow, transported, unpack)
from prunekit.vision.models import SmallCNN
from prunekit.vision.schedules import compute_masks
from prunekit.vision.train import load_data, load_run, make_config, save_run, train_epochs, train_prune

torch.set_num_threads(1)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = transported(a), transported(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_one_client_equals_central_training_for_the_same_steps():
    data = load_data("synthetic", 96, 32, 0)
    torch.manual_seed(0)
    start = SmallCNN(10, 4)
    # dense FedAvg: two rounds of one local epoch == two central phases with the clients' data-order seeds
    cfg = make_config(model="cnn", dataset="synthetic", batch_size=32, learn="fedtiny",
                      options={"variant": "dense", "clients": 1, "rounds": 2})
    fed, masks, info = train_prune(cfg, progress=False, model=copy.deepcopy(start), data=data)
    central = copy.deepcopy(start)
    for r in (1, 2):
        train_epochs(central, data, 1, cfg, None, progress=False, seed=client_seed(cfg.seed, r, 0))
    assert masks is None and info["learn"]["client_images"] == [96]
    _states_equal(fed, central)
    # prune-after: 2 dense rounds, magnitude pruning on the server, 1 masked round (sparse records both ways)
    cfg = make_config(model="cnn", dataset="synthetic", batch_size=32, sparsity=0.8, learn="fedtiny",
                      options={"variant": "prune-after", "clients": 1, "rounds": 3, "finetune_rounds": 1})
    fed, masks, _ = train_prune(cfg, progress=False, model=copy.deepcopy(start), data=data)
    central = copy.deepcopy(start)
    for r in (1, 2):
        train_epochs(central, data, 1, cfg, None, progress=False, seed=client_seed(cfg.seed, r, 0))
    k = compute_masks(central, 0.8, "magnitude", "global")
    k.apply(central)
    train_epochs(central, data, 1, cfg, k, progress=False, seed=client_seed(cfg.seed, 3, 0))
    assert all(torch.equal(masks[n], k[n]) for n in k)
    _states_equal(fed, central)


def test_fedavg_weights_the_clients_by_their_images():
    data = load_data("synthetic", 96, 32, 0)
    torch.manual_seed(0)
    start = SmallCNN(10, 4)
    cfg = make_config(model="cnn", dataset="synthetic", batch_size=32, learn="fedtiny",
                      options={"variant": "dense", "clients": 2, "rounds": 1, "alpha": 0.3})
    fed, _, info = train_prune(cfg, progress=False, model=copy.deepcopy(start), data=data)
    shards = client_shards(data, FedTinyOptions(clients=2, alpha=0.3), cfg.seed)
    n = [len(s["y_train"]) for s in shards]
    assert n == info["learn"]["client_images"] and n[0] != n[1]
    local = []
    for i, shard in enumerate(shards):
        m = copy.deepcopy(start)
        train_epochs(m, shard, 1, cfg, None, progress=False, seed=client_seed(cfg.seed, 1, i))
        local.append(transported(m))
    for k, v in transported(fed).items():
        torch.testing.assert_close(v, n[0] / sum(n) * local[0][k] + n[1] / sum(n) * local[1][k])


def test_dirichlet_split_is_a_seeded_partition_and_small_alpha_is_non_iid():
    y = torch.arange(10).repeat(60)
    parts = dirichlet_split(y, 4, 0.1, seed=3)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(600))
    assert all(torch.equal(a, b) for a, b in zip(parts, dirichlet_split(y, 4, 0.1, seed=3)))
    few = sum(int(y[p].unique().numel()) for p in parts)
    many = sum(int(y[p].unique().numel()) for p in dirichlet_split(y, 4, 100.0, seed=3))
    assert few < many == 40
    with pytest.raises(PruneError, match="cannot give each of 50 clients"):
        dirichlet_split(torch.arange(10).repeat(4), 50, 0.5)


def test_records_carry_kept_values_and_the_bitmap_only_when_asked():
    w = torch.arange(16.0).reshape(4, 4) - 5
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[0, 1] = m[2, 3] = m[3, 0] = True
    from prunekit.core.masks import Masks

    state = {"w": w, "b": torch.tensor([1.5, -2.0])}
    rec = pack(state, Masks({"w": m}), send_masks=True)
    assert rec["w"].numpy().tolist() == [-4.0, 6.0, 7.0] and rec["w::mask"].numpy().nbytes == 2
    back = masks_of(rec, state)
    assert torch.equal(back["w"], m)
    dense = unpack(rec, state, back)
    assert torch.equal(dense["w"], w * m) and torch.equal(dense["b"], state["b"])
    bare = pack(state, Masks({"w": m}))
    assert masks_of(bare, state) is None
    # bytes: each Array's serialized data (the .npy header + the values), not the dense size
    from flwr.app import RecordDict

    assert payload_bytes(RecordDict({"a": rec})) - payload_bytes(RecordDict({"a": bare})) == len(rec["w::mask"].data)
    assert len(bare["w"].data) < len(pack(state)["w"].data)


def test_prune_and_grow_by_hand():
    from prunekit.core.masks import Masks

    w = torch.tensor([[0.9, 0.1, 0.0, 0.5], [0.0, -0.2, 0.0, 0.0]])
    m = w != 0
    g = torch.tensor([[0.0, 0.0, -3.0, 0.0], [0.5, 0.0, 0.0, 0.0]])  # one position never reported (g = 0)
    new, moved = prune_and_grow({"a": w}, Masks({"a": m}), {"a": g}, {"a": 2})
    # the two smallest kept |w| (0.1, -0.2) go; the two largest |g| of pruned positions (-3.0, 0.5) come
    assert moved == {"a": 2} and new["a"].tolist() == [[True, False, True, True], [True, False, False, False]]
    assert int(new["a"].sum()) == int(m.sum())
    new, moved = prune_and_grow({"a": w}, Masks({"a": m}), {"a": g}, {"a": 3})  # only 2 reported: move 2
    assert moved == {"a": 2} and int(new["a"].sum()) == 4


def test_fedtiny_selects_by_loss_and_keeps_the_sparsity_through_the_rounds():
    data = load_data("synthetic", 192, 32, 0)
    cfg = make_config(model="cnn", dataset="synthetic", batch_size=32, sparsity=0.9, learn="fedtiny",
                      options={"clients": 3, "rounds": 4, "adjust_every": 1, "adjust_fraction": 0.3,
                               "candidates": 5, "finetune_rounds": 1})
    torch.manual_seed(0)
    model, masks, info = train_prune(cfg, progress=False, model=SmallCNN(10, 4), data=data)
    L = info["learn"]
    sel = L["selection"]
    assert sel["chosen"] == min(range(5), key=lambda c: sel["losses"][c]) and sel["perturbed"] == [False] * 4 + [True]
    kept = masks.kept()
    assert L["sparsity_per_round"] == [pytest.approx(1 - kept / masks.numel())] * 4
    assert abs(masks.sparsity() - 0.9) < 1e-4 and info["metrics"]["weight_zeros"] >= masks.sparsity()
    assert L["moved"][0] > 0 and L["moved"][3] is None  # adjusted in r < T_end = 3, fixed in the last round
    c = L["communication"]
    selection = c["selection_down"] + c["selection_up"]
    assert selection > 0 and c["bytes_total"] == sum(r["down"] + r["up"] for r in c["per_round"]) + selection
    rounds = {r["round"]: r for r in c["per_round"]}
    assert rounds[1]["up"] > rounds[4]["up"]  # the gradient report rides on round 1 only
    assert rounds[4]["down"] < 0.2 * 3 * c["dense_model_bytes"]  # sparse values, no bitmap (mask unchanged)
    mem = L["client_memory"]
    assert mem["values_held"] < 0.2 * L["client_memory_dense"]["values_held"]
    assert info["journey"]["steps"] == 4 * sum((n + 31) // 32 for n in L["client_images"])


def test_cli_runs_loads_back_and_mistakes_exit_2(tmp_path):
    from tests.conftest import error_line, invoke

    args = ["train-prune", "cnn", "--dataset", "synthetic", "--train-subset", "128", "--test-subset", "32",
            "--batch-size", "64", "--sparsity", "0.9", "--learn", "fedtiny", "--quiet"]
    rc, out, err = invoke(*args, "--option", "clients=2", "--option", "rounds=2", "--option", "finetune_rounds=1",
                          "--option", "candidates=2", "--out", tmp_path / "r")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "r" / "prunekit.json").read_text())
    assert manifest["learn"]["variant"] == "fedtiny" and manifest["learn"]["communication"]["bytes_total"] > 0
    model, masks, _ = load_run(tmp_path / "r")
    assert masks is not None and abs(masks.sparsity() - 0.9) < 1e-4
    for bad, word in [("clients=0", "clients must be between 1 and 100"), ("alpha=0", "alpha must be positive"),
                      ("allocations=[owl]", "allocations must be a list of"), ("variant=fedprox", "variant"),
                      ("finetune_rounds=2", "finetune_rounds must be in [0, rounds=2)"),
                      ("clients=40", "cannot give each of 40 clients")]:
        rc, _, err = invoke(*args, "--option", "rounds=2", "--option", "finetune_rounds=1", "--option", bad,
                            "--out", tmp_path / "bad")
        assert rc == 2 and word in error_line(err) and not (tmp_path / "bad").exists(), (bad, err)
    rc, _, err = invoke(*[a if a != "0.9" else "0" for a in args], "--out", tmp_path / "bad")
    assert rc == 2 and "needs a sparsity above 0" in error_line(err) and not (tmp_path / "bad").exists()


def test_save_and_load_give_identical_outputs(tmp_path):
    data = load_data("synthetic", 96, 32, 0)
    cfg = make_config(model="cnn", dataset="synthetic", batch_size=32, sparsity=0.9, learn="fedtiny",
                      options={"clients": 2, "rounds": 2, "finetune_rounds": 1, "candidates": 2})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, _, manifest = load_run(tmp_path / "run")
    assert manifest["learn"]["selection"]["chosen"] == info["learn"]["selection"]["chosen"]
    x = data["x_test"][:8]
    torch.testing.assert_close(back(x), model.eval()(x))
