"""The Ray Data engine gives the same results as the local engine on the same seed (embedding, k-means,
prototype scores, training-dynamics scores), and the local k-means is a correct k-means."""

from __future__ import annotations

import numpy as np
import pytest

from prunekit.data import ScoreConfig, load_dataset, score
from prunekit.data.clusters import kmeans
from prunekit.data.embed import embed
from prunekit.data.engine import LocalEngine, get_engine
from prunekit.errors import PruneError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Data tests train small models: one torch thread (tests/conftest.py)."""


def test_kmeans_finds_planted_clusters_and_matches_sklearn_objective():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6)) * 10
    lab = np.repeat(np.arange(4), 50)
    X = (centers[lab] + rng.normal(size=(200, 6))).astype(np.float32)
    cl = kmeans(X, 4, seed=0, engine=LocalEngine(block_size=37))  # odd blocks: the reduction must not care
    # same partition as the planted one (up to renaming)
    assert len({(a, b) for a, b in zip(lab, cl.labels)}) == 4
    ref = KMeans(4, n_init=5, random_state=0).fit(X)
    assert cl.inertia == pytest.approx(ref.inertia_, rel=1e-4)
    assert np.allclose(cl.distance, np.linalg.norm(X - cl.centroids[cl.labels], axis=1), atol=1e-5)


def test_kmeans_bad_k():
    with pytest.raises(PruneError, match="clusters"):
        kmeans(np.zeros((5, 2)), 6)


def test_unknown_engine():
    with pytest.raises(PruneError, match="Unknown engine"):
        get_engine("spark")


@pytest.fixture(scope="module")
def ray_engine():
    pytest.importorskip("ray")
    from prunekit.data.engine import RayEngine

    eng = RayEngine(block_size=128, num_cpus=2)
    yield eng
    import ray

    ray.shutdown()


@pytest.mark.slow  # starting Ray takes 30-60 s on the shared 2-core machine; `make test` runs it
def test_ray_and_local_agree(ray_engine):
    ds = load_dataset("digits").subset(np.arange(400))
    local = LocalEngine(block_size=128)
    # embeddings: row for row
    z_l = embed(ds, "pca", engine=local, dim=16)
    z_r = embed(ds, "pca", engine=ray_engine, dim=16)
    assert np.allclose(z_l, z_r, atol=1e-6)
    # prototype scores (embedding + distributed k-means) and their clusters
    cfg = ScoreConfig(encoder="pca", clusters=8, embed_dim=16, seed=3)
    p_l, p_r = score(ds, "prototype", cfg, engine=local), score(ds, "prototype", cfg, engine=ray_engine)
    assert np.array_equal(p_l.extra["cluster"], p_r.extra["cluster"])
    assert np.allclose(p_l.values, p_r.values, atol=1e-8)
    # a training-dynamics score: one Ray task per seed, same seeds, same numbers
    cfg = ScoreConfig(model="mlp", seeds=2, epochs=2, seed=1)
    e_l, e_r = score(ds, "el2n", cfg, engine=local), score(ds, "el2n", cfg, engine=ray_engine)
    assert np.allclose(e_l.values, e_r.values, atol=1e-5)
    # and a different seed gives different numbers (the comparison is not vacuous)
    e_2 = score(ds, "el2n", ScoreConfig(model="mlp", seeds=2, epochs=2, seed=2), engine=ray_engine)
    assert not np.allclose(e_l.values, e_2.values, atol=1e-3)
