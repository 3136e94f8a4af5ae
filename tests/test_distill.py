"""Compress, then distil: the loss, the iterative schedule, resumable checkpoints, the CLI and the evaluation
texts kept apart from the training text."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunekit.errors import PruneError
from prunekit.recipe import Distill, Recipe
from prunekit.structure import layer_sizes, prune_structured
from prunekit.arch import adapter_for
from prunekit.train import distill as D
from tests.conftest import VOCAB, error_line, invoke, tiny_model


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (12, 24), generator=torch.Generator().manual_seed(3))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_teacher_equal_to_student_gives_zero_loss_and_leaves_the_weights(ids, hidden_weight, one_thread):
    student = tiny_model("llama", layers=3)
    teacher = copy.deepcopy(student)
    before = _state(student)
    cfg = Distill(steps=4, batch_size=3, lr=1e-2, hidden_weight=hidden_weight, lm_weight=0.0)
    res = D.distill_part(student, teacher, ids, cfg, D.Lineage([0, 1, 2]), part=0, steps=4, progress=False)
    assert res.losses == [0.0] * 4
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a different teacher moves the student (the test above would pass for a loop that never trains)
    teacher2 = tiny_model("llama", layers=3, seed=1)
    res2 = D.distill_part(student, teacher2, ids, cfg, D.Lineage([0, 1, 2]), part=0, steps=4, progress=False)
    assert res2.losses[0] > 0 and res2.losses[-1] < res2.losses[0]
    assert any(not torch.equal(before[k], student.state_dict()[k]) for k in before)


def test_hidden_loss_follows_the_lineage():
    t = [torch.randn(2, 5, 8) for _ in range(4)]
    keep = [0, 2, 3, 7]
    s = [t[0][..., keep], t[2][..., keep]]  # student block 0 came from teacher block 0, block 1 from block 2
    assert float(D.hidden_loss(s, t, D.Lineage([0, 2], keep))) == 0.0
    assert float(D.hidden_loss(s, t, D.Lineage([0, 1], keep))) > 0.1
    lin = D.Lineage(list(range(6))).after({"removed_layers": [1, 4]}).after({"removed_layers": [0], "hidden_kept": [1, 3]})
    assert lin.blocks == [2, 3, 5] and lin.hidden == [1, 3]
    assert D.Lineage([0, 1], [4, 5, 6]).after({"hidden_kept": [0, 2]}).hidden == [4, 6]


def _sizes(m):
    a = adapter_for(m)
    return {"layers": layer_sizes(a, m), "hidden": m.config.hidden_size}


STRUCTURES = [
    ({"remove_layers": 3}, 2),
    ({"remove_layers": 3}, 3),
    ({"kinds": ["heads", "mlp"], "sparsity": 0.5}, 2),
    ({"kinds": ["mlp"], "sparsity": 0.6}, 3),
    ({"kinds": ["hidden"], "sparsity": 0.25}, 3),
    ({"kinds": ["mlp", "hidden"], "sparsity": 0.3, "remove_layers": 2}, 2),
]


@pytest.mark.parametrize("structure,parts", STRUCTURES)
def test_iterative_schedule_reaches_the_exact_target_structure(ids, structure, parts, one_thread):
    one, _ = prune_structured(tiny_model("llama", layers=6), Recipe.make(structure=structure), ids, progress=False)
    rec = Recipe.make(structure=structure, distill={"steps": parts, "iterations": parts, "batch_size": 2})
    m, rep = D.compress_and_distill(tiny_model("llama", layers=6), rec, ids, ids, progress=False)
    assert _sizes(m) == _sizes(one)
    assert rep.summary["params"] == sum(p.numel() for p in one.parameters())
    assert rep.summary["distill"]["parts"] == parts and len(rep.summary["parts"]) == parts


def test_iterative_global_ranking_removes_the_same_number_of_units(ids, one_thread):
    st = {"kinds": ["mlp"], "sparsity": 0.5, "global_rank": True}
    one, _ = prune_structured(tiny_model("llama", layers=4), Recipe.make(structure=st), ids, progress=False)
    rec = Recipe.make(structure=st, distill={"steps": 3, "iterations": 3, "batch_size": 2})
    m, _ = D.compress_and_distill(tiny_model("llama", layers=4), rec, ids, ids, progress=False)
    width = lambda x: sum(s["intermediate"] for s in layer_sizes(adapter_for(x), x))  # noqa: E731
    assert width(m) == width(one)


def test_split_amounts_add_up():
    from prunekit.structure.prune import split_amounts

    for t in range(0, 9):
        for k in range(1, 6):
            parts = split_amounts({"layers": t}, k)
            assert sum(p["layers"] for p in parts) == t and all(p["layers"] >= 0 for p in parts)


def test_unstructured_distillation_keeps_the_zeros(ids, one_thread):
    m = tiny_model("llama", layers=2)
    rec = Recipe.make(method="wanda", sparsity=0.5, distill={"steps": 5, "batch_size": 3, "lr": 1e-2})
    before = _state(m)
    m, rep = D.compress_and_distill(m, rec, ids, ids, progress=False)
    w = m.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-6)
    assert rep.summary["target_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], m.model.layers[0].self_attn.q_proj.weight)
    assert rep.summary["distill"]["steps"] == 5


RESUMES = [
    ({"structure": {"kinds": ["mlp", "hidden"], "sparsity": 0.25}}, 2, [2, 3, 5]),  # mid-part, end of part 1, in part 2
    ({"method": "sparsegpt", "sparsity": 0.5}, 1, [2, 4]),
]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("prune,parts,kill_after", RESUMES)
def test_resumed_distillation_equals_an_uninterrupted_run(ids, tmp_path, monkeypatch, prune, parts, kill_after, one_thread):
    rec = Recipe.make(**prune, distill={"steps": 6, "iterations": parts, "batch_size": 2, "checkpoint_every": 2,
                                        "hidden_weight": 0.5, "lr": 5e-3})
    ref, _ = D.compress_and_distill(tiny_model("llama", layers=3), rec, ids, ids, work_dir=tmp_path / "ref", progress=False)
    want = _state(ref)
    for k in kill_after:
        work = tmp_path / f"w{k}"

        def boom(step, k=k):
            if step == k:
                raise _Killed

        monkeypatch.setattr(D, "_after_checkpoint", boom)
        with pytest.raises(_Killed):
            D.compress_and_distill(tiny_model("llama", layers=3), rec, ids, ids, work_dir=work, progress=False)
        monkeypatch.setattr(D, "_after_checkpoint", lambda step: None)
        got, rep = D.compress_and_distill(tiny_model("llama", layers=3), rec, ids, ids, work_dir=work, resume=True,
                                          progress=False)
        assert rep.summary["distill"]["resumed_at_step"] == k
        state = got.state_dict()
        assert set(state) == set(want) and all(torch.equal(state[n], want[n]) for n in want), k


def test_a_checkpoint_of_another_run_is_refused(ids, tmp_path, monkeypatch):
    rec = Recipe.make(structure={"remove_layers": 1}, distill={"steps": 4, "batch_size": 2, "checkpoint_every": 2})
    monkeypatch.setattr(D, "_after_checkpoint", lambda step: (_ for _ in ()).throw(_Killed()) if step == 2 else None)
    with pytest.raises(_Killed):
        D.compress_and_distill(tiny_model("llama", layers=3), rec, ids, ids, work_dir=tmp_path / "w", progress=False)
    other = Recipe.make(structure={"remove_layers": 1}, distill={"steps": 4, "batch_size": 2, "checkpoint_every": 2, "lr": 1e-3})
    with pytest.raises(PruneError, match="different run \\(its recipe differs\\)"):
        D.compress_and_distill(tiny_model("llama", layers=3), other, ids, ids, work_dir=tmp_path / "w", resume=True, progress=False)
    with pytest.raises(PruneError, match="its model differs"):
        D.compress_and_distill(tiny_model("llama", layers=3, seed=5), rec, ids, ids, work_dir=tmp_path / "w", resume=True,
                               progress=False)


def test_distill_recipe_mistakes_are_one_sentence():
    with pytest.raises(PruneError, match="every loss weight is 0"):
        Recipe.make(structure={"remove_layers": 1}, distill={"logit_weight": 0})
    with pytest.raises(PruneError, match="not both"):
        Recipe.make(distill={"steps": 2}, recovery={"method": "perp"})
    with pytest.raises(PruneError, match="iterations"):
        Recipe.make(method="wanda", distill={"steps": 4, "iterations": 2})
    with pytest.raises(PruneError, match="cannot be split"):
        Recipe.make(structure={"remove_layers": 1}, distill={"steps": 2, "iterations": 3})


def test_out_of_domain_text_never_overlaps_the_training_text():
    from prunekit.zoo.text import load_text, out_of_domain, shared_ngrams

    a = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    assert shared_ngrams(a, "x " + a.upper() + " y") == 2 and shared_ngrams(a, a[::-1]) == 0
    for train in ("shakespeare", "pydoc"):
        ood = out_of_domain(train)
        assert ood != train
        assert shared_ngrams(load_text(train, "calibration"), load_text(ood, "evaluation")) == 0
        assert shared_ngrams(load_text(train, "calibration"), load_text(ood, "all")) == 0


def test_cli_structure_then_distill_with_resume(tiny_dir, tmp_path, monkeypatch):
    d, text = tiny_dir
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"word{i % 97} thing{i % 13}" for i in range(3000)))
    out = tmp_path / "o"
    args = ["prune", d, "--structure", "mlp", "--sparsity", "0.5", "--calib", text, "--calib-samples", "8",
            "--seqlen", "32", "--distill", "4", "--distill-text", text, "--ood-text", other, "--recipe", tmp_path / "r.yaml",
            "--eval-windows", "3", "--generations", "0", "--out", out, "--quiet"]
    (tmp_path / "r.yaml").write_text("distill: {batch_size: 2, samples: 16, seqlen: 32, checkpoint_every: 2}\n")

    monkeypatch.setattr(D, "_after_checkpoint", lambda step: (_ for _ in ()).throw(KeyboardInterrupt()) if step == 2 else None)
    rc, _, _ = invoke(*args)
    assert rc == 130 and not out.exists() and (tmp_path / ".o.distill" / "checkpoint" / "state.json").is_file()
    monkeypatch.setattr(D, "_after_checkpoint", lambda step: None)
    rc, stdout, err = invoke(*args, "--resume")
    assert rc == 0, err
    assert "resumed at step 2" in stdout and "out of domain" in stdout
    assert not (tmp_path / ".o.distill").exists()  # removed once the result is written
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["distill"]["steps"] == 4 and man["summary"]["distill"]["resumed_at_step"] == 2
    ood = man["metrics"]["ood"]
    assert ood["text"] == str(other) and ood["shared_13grams_with_training"] == 0 and ood["perplexity"] > 0
    assert 0 <= ood["agreement"] <= 1 and "perplexity_oneshot" in man["metrics"]
    from prunekit.io import load_any

    m, _ = load_any(out)
    assert m.model.layers[0].mlp.gate_proj.out_features == 64


@pytest.mark.parametrize("flags,words", [
    (["--distill", "0"], "distill.steps"),
    (["--distill", "3", "--recover", "perp"], "not both"),
    (["--distill", "3", "--stream"], "not streamed"),
    (["--resume"], "--stream"),
    (["--distill", "3", "--distill-precision", "fp8"], "precision"),
])
def test_cli_distill_mistakes_exit_2(tiny_dir, tmp_path, flags, words):
    d, text = tiny_dir
    rc, _, err = invoke("prune", d, "--structure", "mlp", "--sparsity", "0.5", "--calib", text, *flags,
                        "--out", tmp_path / "o")
    assert rc == 2 and words in error_line(err) and not (tmp_path / "o").exists()
