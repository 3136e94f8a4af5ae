"""Training on a subset: the trainer learns, fixed-step training, distillation pulls the student to the teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.data import TrainConfig, load_dataset, select, train_subset
from prunekit.data.train import features, fit, predict


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Data tests train small models: one torch thread (tests/conftest.py)."""


def test_cnn_and_mlp_learn_digits():
    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    for model in ("fast-cnn", "mlp", "linear"):
        out = train_subset(tr, None, TrainConfig(model=model, epochs=8, lr=5e-3), test=te)
        assert out["test_accuracy"] > 0.85, (model, out["test_accuracy"])


def test_cnn_is_the_old_spelling_of_fast_cnn():
    """Data's 'cnn' (another network than vision's 'cnn') still works for one release, with a warning."""
    from prunekit.data.scores import ScoreConfig
    from prunekit.zoo.nets import FastCNN

    with pytest.warns(FutureWarning, match="fast-cnn"):
        cfg = TrainConfig(model="cnn")
    assert cfg.model == "fast-cnn"
    with pytest.warns(FutureWarning, match="fast-cnn"):
        assert ScoreConfig(model="cnn").model == "fast-cnn"
    x = features(load_dataset("digits"))
    assert isinstance(fit(x[:64], torch.zeros(64, dtype=torch.long), 10, TrainConfig(steps=1)).net, FastCNN)


def test_fixed_steps():
    tr = load_dataset("digits")
    seen = []
    x, y = features(tr), torch.from_numpy(tr.y)
    fit(x[:100], y[:100], 10, TrainConfig(model="mlp", steps=7, batch_size=32), on_batch=lambda e, i, l: seen.append(len(i)))
    assert len(seen) == 7  # 7 steps over 4 batches per epoch: stops mid-epoch


def test_distillation_pulls_a_small_subset_toward_the_teacher():
    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    keep = select(np.zeros(len(tr)), 0.1, "random", seed=0)
    cfg = TrainConfig(model="mlp", steps=150, lr=5e-3, seed=0)
    teacher = train_subset(tr, None, TrainConfig(model="mlp", epochs=15, lr=5e-3, seed=1), test=te)["model"]
    plain = train_subset(tr, keep, cfg, test=te)
    kd = train_subset(tr, keep, cfg, test=te, distill=True, teacher=teacher)
    xt = features(te)
    t_pred = predict(teacher, xt).argmax(1)
    agree = lambda m: float((predict(m, xt).argmax(1) == t_pred).float().mean())  # noqa: E731
    assert kd["distill"] and not plain["distill"]
    assert agree(kd["model"]) > agree(plain["model"])
    assert kd["test_accuracy"] >= plain["test_accuracy"] - 0.01
    assert kd["teacher_test_accuracy"] > 0.9


def test_training_is_reproducible():
    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    a = train_subset(tr, np.arange(300), TrainConfig(model="mlp", epochs=2, seed=4), test=te)["test_accuracy"]
    b = train_subset(tr, np.arange(300), TrainConfig(model="mlp", epochs=2, seed=4), test=te)["test_accuracy"]
    assert a == b
