"""Each score ranks a planted set of bad examples as hardest, on scikit-learn digits (fast, 1 thread)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.data import ScoreConfig, load_dataset, score
from prunekit.data.scores import SCORES
from prunekit.errors import PruneError

PLANT = 60


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Data tests train small models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def mislabeled():
    """digits (1347 training images) with 60 labels flipped to another class."""
    ds = load_dataset("digits")
    rng = np.random.default_rng(0)
    bad = rng.choice(len(ds), PLANT, replace=False)
    ds.y = ds.y.copy()
    ds.y[bad] = (ds.y[bad] + rng.integers(1, 10, PLANT)) % 10
    return ds, bad


def precision_at_planted(values, planted):
    top = np.argsort(-values, kind="stable")[:len(planted)]
    return np.isin(top, planted).mean()


@pytest.mark.parametrize("name,epochs,floor", [("el2n", 8, 0.7), ("grand", 8, 0.6), ("aum", 8, 0.7),
                                               ("forgetting", 8, 0.5)])
def test_training_dynamics_scores_find_mislabeled(mislabeled, name, epochs, floor):
    ds, bad = mislabeled
    res = score(ds, name, ScoreConfig(model="mlp", seeds=2, epochs=epochs))
    assert res.values.shape == (len(ds),)
    # base rate is 60 / 1347 = 4.5%: a score that ignores the labels cannot get near the floor
    assert precision_at_planted(res.values, bad) >= floor


def test_grand_last_layer_agrees_with_all_parameters(mislabeled):
    ds, bad = mislabeled
    a = score(ds, "grand", ScoreConfig(model="mlp", seeds=1, epochs=4, grand_params="all")).values
    b = score(ds, "grand", ScoreConfig(model="mlp", seeds=1, epochs=4, grand_params="last")).values
    assert np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1] > 0.8
    assert precision_at_planted(b, bad) >= 0.5


def test_grand_all_is_the_true_per_example_gradient_norm():
    from prunekit.data.scores.grand import _norms_all
    from prunekit.data.train import MLP

    torch.manual_seed(0)
    model = MLP(5, 3, hidden=4)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    fast = _norms_all(model, x, y)
    for i in range(6):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        assert fast[i] == pytest.approx(float(ref), rel=1e-4)


def mean_percentile(values, planted):
    return (np.argsort(np.argsort(values, kind="stable")) / len(values))[planted].mean()


def test_entropy_finds_ambiguous_blends():
    """Half-half blends of two digits of different classes are ambiguous: their predictions spread out."""
    ds = load_dataset("digits")
    rng = np.random.default_rng(1)
    a, b = rng.choice(len(ds), PLANT), rng.choice(len(ds), 4 * PLANT)
    b = b[ds.y[b] != ds.y[a[0]]][:PLANT]
    a = a[:len(b)]
    blends = ((ds.x[a].astype(np.float32) + ds.x[b]) / 2).astype(np.uint8)
    ds.x = np.concatenate([ds.x, blends])
    ds.y = np.concatenate([ds.y, ds.y[a]])
    planted = np.arange(len(ds) - len(a), len(ds))
    res = score(ds, "entropy", ScoreConfig(model="mlp", seeds=2, epochs=4))
    # base rate 4.3%; real digits confused by the model (4/9, 1/7, ...) compete for the top ranks
    assert precision_at_planted(res.values, planted) >= 0.25
    assert mean_percentile(res.values, planted) >= 0.8


def test_prototype_finds_outliers_without_labels():
    """Pixel-shuffled digits (each a different pattern) lie far from every k-means prototype."""
    ds = load_dataset("digits")
    rng = np.random.default_rng(1)
    out = ds.x[rng.choice(len(ds), 30)].reshape(30, -1).copy()
    for row in out:
        rng.shuffle(row)
    ds.x = np.concatenate([ds.x, out.reshape(30, 8, 8)])
    ds.y = None  # label-free
    res = score(ds, "prototype", ScoreConfig(encoder="pca", clusters=10, embed_dim=32))
    planted = np.arange(len(ds) - 30, len(ds))
    assert precision_at_planted(res.values, planted) >= 0.4
    assert mean_percentile(res.values, planted) >= 0.9
    assert res.extra["embedding"].shape == (len(ds), 32) and res.extra["cluster"].max() < 10
    assert res.info["encoder"] == "pca"


def test_random_is_seeded_and_uniform():
    ds = load_dataset("digits")
    a = score(ds, "random", ScoreConfig(seed=3)).values
    b = score(ds, "random", ScoreConfig(seed=3)).values
    c = score(ds, "random", ScoreConfig(seed=4)).values
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.4 < a.mean() < 0.6


def test_scores_are_reproducible_from_the_seed(mislabeled):
    ds, _ = mislabeled
    a = score(ds, "el2n", ScoreConfig(model="mlp", seeds=1, epochs=2, seed=5)).values
    b = score(ds, "el2n", ScoreConfig(model="mlp", seeds=1, epochs=2, seed=5)).values
    c = score(ds, "el2n", ScoreConfig(model="mlp", seeds=1, epochs=2, seed=6)).values
    assert np.allclose(a, b) and not np.allclose(a, c)


def test_labelled_scores_refuse_unlabelled_data():
    ds = load_dataset("digits")
    ds.y = None
    with pytest.raises(PruneError, match="needs labels"):
        score(ds, "el2n")
    with pytest.raises(PruneError, match="Unknown score"):
        score(load_dataset("digits"), "nope")
    assert set(SCORES) == {"random", "el2n", "grand", "forgetting", "aum", "entropy", "prototype"}


def test_cnn_scores_on_images():
    """The default model for images is the small CNN; it must also rank mislabeled examples high."""
    ds = load_dataset("digits")
    rng = np.random.default_rng(0)
    bad = rng.choice(len(ds), PLANT, replace=False)
    ds.y = ds.y.copy()
    ds.y[bad] = (ds.y[bad] + 1) % 10
    res = score(ds, "aum", ScoreConfig(seeds=1, epochs=10, batch_size=64, lr=5e-3))
    assert precision_at_planted(res.values, bad) >= 0.5
