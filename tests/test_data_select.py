"""Selection strategies: sizes, orderings, CCS coverage, class balance, DBP budgets, SemDeDup, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from prunekit.data.select import _largest_remainder, ccs_bins, cluster_complexity, select, semdedup
from prunekit.errors import PruneError


@pytest.fixture
def skewed():
    rng = np.random.default_rng(0)
    # most scores are easy, a long tail of hard ones (the shape that makes "hardest" miss whole regions)
    scores = np.concatenate([rng.exponential(0.1, 900), rng.uniform(1, 3, 100)])
    labels = np.concatenate([np.zeros(600, int), np.ones(300, int), np.full(100, 2)])
    return scores, labels


def test_hardest_easiest_random(skewed):
    s, _ = skewed
    h = select(s, 0.1, "hardest")
    e = select(s, 0.1, "easiest")
    r = select(s, 0.1, "random", seed=1)
    assert len(h) == len(e) == len(r) == 100
    assert s[h].min() >= np.sort(s)[-100] and s[e].max() <= np.sort(s)[99]
    assert np.array_equal(r, select(s, 0.1, "random", seed=1)) and not np.array_equal(r, select(s, 0.1, "random", seed=2))
    assert np.all(np.diff(h) > 0)  # sorted, unique
    assert len(select(s, 1.0, "hardest")) == len(s)


def test_ties_are_broken_by_the_seed_not_the_position():
    s = np.zeros(100)
    a, b = select(s, 0.2, "hardest", seed=0), select(s, 0.2, "hardest", seed=1)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(20))


def test_ccs_covers_every_score_bin(skewed):
    s, _ = skewed
    bins = 10
    keep = select(s, 0.1, "ccs", beta=0.0, bins=bins, seed=0)
    assert len(keep) == 100
    occupied = set(np.unique(ccs_bins(s, bins)))
    picked = set(np.unique(ccs_bins(s, bins)[keep]))
    assert picked == occupied  # every non-empty stratum is represented
    hard = select(s, 0.1, "hardest")
    assert len(set(np.unique(ccs_bins(s, bins)[hard]))) < len(occupied)  # unlike hardest-only


def test_ccs_drops_the_hardest_beta_and_spreads_the_budget(skewed):
    s, _ = skewed
    keep = select(s, 0.3, "ccs", beta=0.05, bins=20, seed=0)
    assert len(keep) == 300
    hardest = np.argsort(-s)[:50]
    assert not np.isin(hardest, keep).any()
    # small strata are kept whole before big ones get the rest: the tail is oversampled relative to random
    tail = np.setdiff1d(np.flatnonzero(s > 1), hardest)
    assert np.isin(tail, keep).mean() > 0.3 * 2
    assert np.array_equal(keep, select(s, 0.3, "ccs", beta=0.05, bins=20, seed=0))


def test_ccs_errors(skewed):
    s, _ = skewed
    with pytest.raises(PruneError, match="beta \\+ keep > 1"):
        select(s, 0.5, "ccs", beta=0.6)
    with pytest.raises(PruneError, match="beta"):
        select(s, 0.5, "ccs", beta=1.5)


@pytest.mark.parametrize("strategy", ["hardest", "easiest", "random", "ccs"])
def test_class_balance_holds(skewed, strategy):
    s, y = skewed
    keep = select(s, 0.2, strategy, labels=y, class_balanced=True, seed=0)
    counts = np.bincount(y[keep], minlength=3)
    assert counts.tolist() == [120, 60, 20]  # 20% of every class
    unbalanced = np.bincount(y[select(s, 0.2, "hardest")], minlength=3)
    assert unbalanced[2] == 100  # the hard tail is all class 2: balance is what changes it


def test_largest_remainder():
    q = _largest_remainder(np.array([3, 3, 4]), 5)
    assert q.sum() == 5 and (q <= [3, 3, 4]).all()
    q = _largest_remainder(np.array([1, 100, 100]), 50, weights=np.array([10.0, 1.0, 1.0]))
    assert q.tolist()[0] == 1 and q.sum() == 50  # a full group hands its excess on


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.01, None])
def test_bad_keep_fraction(keep):
    with pytest.raises(PruneError, match="keep fraction must be in \\(0, 1\\]"):
        select(np.arange(10.0), keep, "hardest")


def test_unknown_strategy():
    with pytest.raises(PruneError, match="Unknown strategy"):
        select(np.arange(10.0), 0.5, "bogus")


def blobs(spreads, sizes, seed=0, d=8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(spreads), d)) * 5
    z = np.concatenate([c + rng.normal(size=(m, d)) * s for c, s, m in zip(centers, spreads, sizes)])
    lab = np.concatenate([np.full(m, i) for i, m in enumerate(sizes)])
    return z, lab


def test_dbp_gives_complex_clusters_bigger_budgets():
    z, lab = blobs([0.1, 0.1, 2.0, 2.0], [200, 200, 200, 200])
    ids, intra, inter = cluster_complexity(z, lab)
    assert intra[2] > 5 * intra[0]
    keep = select(np.random.default_rng(0).random(len(z)), 0.4, "dbp", embeddings=z, clusters=lab, temperature=0.5)
    per = np.bincount(lab[keep], minlength=4)
    assert per.sum() == 320
    assert per[2] > 2 * per[0] and per[3] > 2 * per[1]  # the spread-out (complex) clusters keep more
    # budgets capped by the cluster size, the excess handed on
    keep = select(np.zeros(len(z)), 0.9, "dbp", embeddings=z, clusters=lab, temperature=0.01)
    assert len(keep) == 720 and np.bincount(lab[keep]).max() <= 200


def test_dbp_needs_embeddings():
    with pytest.raises(PruneError, match="--score prototype"):
        select(np.arange(10.0), 0.5, "dbp")


def test_semdedup_drops_planted_duplicates():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 16))
    src = rng.choice(300, 40, replace=False)
    dups = z[src] + rng.normal(size=(40, 16)) * 1e-3  # near-copies
    allz = np.concatenate([z, dups])
    lab = (allz[:, 0] > 0).astype(int)  # two coarse clusters
    keep = select(np.zeros(len(allz)), None, "semdedup", embeddings=allz, clusters=lab, eps=0.01)
    dropped = np.setdiff1d(np.arange(len(allz)), keep)
    assert len(dropped) == 40
    # exactly one of each (original, copy) pair survives
    for i, s in enumerate(src):
        assert (s in keep) != (300 + i in keep)
    # with a keep target and no eps, eps is searched to about that size
    keep2 = select(np.zeros(len(allz)), 0.5, "semdedup", embeddings=allz, clusters=lab)
    assert abs(len(keep2) - 170) <= 5 and not np.isin(np.arange(300, 340), keep2).all()


def test_semdedup_eps_zero_keeps_everything_distinct():
    z = np.eye(5)
    assert len(semdedup(z, np.zeros(5, int), eps=0.0)) == 5
