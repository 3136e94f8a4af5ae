"""DP4TL (prunekit.data.transfer): label mapping and feature mapping keep the source parts a planted target maps to,
at the budget, reproducibly; `prunekit data select-for-target` writes a keep file and refuses bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.data import load_keep
from prunekit.data.datasets import DataSet
from prunekit.data.train import TrainConfig, accuracy, features
from prunekit.data.transfer import (feature_mapping_keep, feature_mapping_rank, finetune, keep_groups,
                                    label_frequency, label_mapping_keep, match_images, select_for_target)
from prunekit.errors import PruneError

PLANTED = (1, 4)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small trainings: one torch thread (tests/conftest.py)."""


def planted_logits(per_class=50, classes=6, seed=0):
    """Source labels (``per_class`` of each of ``classes``) and a source model's logits on 40 target images whose
    top-1 predictions are source class 1 (25 images) and 4 (15)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    logits = rng.normal(0, 0.1, (40, classes))
    logits[:25, 1] += 3
    logits[25:, 4] += 3
    return labels, logits


def planted_images(seed=0, per_class=40, n_target=30, size=8):
    """6 classes of noisy copies of random 8x8 prototypes; the target: noisy copies of classes 1 and 4."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, (6, size, size))

    def noisy(cls):
        return np.clip(protos[cls] + rng.normal(0, 25, (len(cls), size, size)), 0, 255).astype(np.uint8)

    ys = np.repeat(np.arange(6), per_class)
    yt = rng.choice(PLANTED, n_target)
    src = DataSet("src", "image", noisy(ys), y=ys.astype(np.int64), classes=[str(i) for i in range(6)])
    tgt = DataSet("tgt", "image", noisy(yt), y=(yt == 4).astype(np.int64))
    return src, tgt


def test_label_mapping_keeps_the_planted_classes_at_their_budget():
    labels, logits = planted_logits()
    for soft in (False, True):
        keep = label_mapping_keep(logits, labels, 100 / 300, soft=soft)
        assert np.array_equal(keep, np.flatnonzero(np.isin(labels, PLANTED)))
    assert label_frequency(logits, 6).tolist() == [0, 25, 0, 0, 15, 0]
    assert np.isclose(label_frequency(logits, 6, soft=True).sum(), 40)


def test_label_mapping_fills_the_budget_from_the_most_mapped_class_down():
    labels, logits = planted_logits()
    keep = label_mapping_keep(logits, labels, 0.25, seed=3)
    assert len(keep) == 75 and np.all(np.diff(keep) > 0)
    assert np.isin(np.flatnonzero(labels == 1), keep).all()  # the most mapped class whole
    assert (labels[keep] == 4).sum() == 25  # the next one partially
    assert np.array_equal(keep, label_mapping_keep(logits, labels, 0.25, seed=3))
    assert not np.array_equal(keep, label_mapping_keep(logits, labels, 0.25, seed=4))
    assert len(label_mapping_keep(logits, labels, 1.0)) == 300
    assert len(label_mapping_keep(logits, labels, 0.5)) == 150  # classes nobody maps to fill the rest


def test_feature_mapping_keeps_the_clusters_near_the_target():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (6, 16))
    labels = np.repeat(np.arange(6), 60)
    src = centers[labels] + rng.normal(0, 0.5, (360, 16))
    tgt = centers[rng.choice(PLANTED, 30)] + rng.normal(0, 0.5, (30, 16)) + 0.3
    keep = feature_mapping_keep(src, tgt, 1 / 3, clusters=6, target_clusters=2)
    assert np.array_equal(keep, np.flatnonzero(np.isin(labels, PLANTED)))
    keep = feature_mapping_keep(src, tgt, 0.25, clusters=6, target_clusters=2, seed=1)
    assert len(keep) == 90 and set(labels[keep]) <= set(PLANTED)
    assert np.array_equal(keep, feature_mapping_keep(src, tgt, 0.25, clusters=6, target_clusters=2, seed=1))
    groups, dist = feature_mapping_rank(src, tgt, 6, 2, seed=1)  # cluster once, keep any budget: the same subset
    assert np.array_equal(keep, keep_groups(groups, dist, 0.25, seed=1)) and len(dist) == 6
    # more clusters than the source has examples, and the mean target feature (1 centroid), are fine
    assert set(labels[feature_mapping_keep(src, tgt[:5], 1 / 6, clusters=6, target_clusters=1)]) <= set(PLANTED)


def test_select_for_target_with_a_trained_source_model():
    src, tgt = planted_images()
    cfg = TrainConfig(steps=60, batch_size=32, seed=0)
    res = select_for_target(src, tgt, "label", 2 / 6, cfg=cfg)
    assert np.array_equal(res.keep, np.flatnonzero(np.isin(src.y, PLANTED)))
    assert sorted(np.argsort(res.info["frequency"])[-2:].tolist()) == list(PLANTED)
    fm = select_for_target(src, tgt, "feature", 2 / 6, model=res.model, clusters=6, target_clusters=2)
    assert np.isin(src.y[fm.keep], PLANTED).mean() >= 0.9 and len(fm.keep) == 80
    # the pre-trained model fine-tunes on the target (a new 2-class head, every weight trained)
    model = finetune(res.model, features(tgt), tgt.y, 2, TrainConfig(steps=30, batch_size=16, seed=0))
    assert model.net.fc.out_features == 2
    assert accuracy(model, features(tgt), torch.from_numpy(tgt.y)) > 0.9


def test_target_images_are_matched_to_the_source_size():
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    big = match_images(x, (28, 28))
    assert big.shape == (5, 28, 28) and big.dtype == np.uint8
    assert match_images(np.full((2, 8, 8), 7, np.uint8), (16, 16, 3)).tolist() == np.full((2, 16, 16, 3), 7).tolist()
    assert match_images(x, (8, 8)).tolist() == x.tolist()


@pytest.mark.parametrize("call, phrase", [
    (lambda l, z: label_mapping_keep(z, l, 0.0), "keep fraction must be in"),
    (lambda l, z: label_mapping_keep(z, l, 1.5), "keep fraction must be in"),
    (lambda l, z: label_mapping_keep(z[:, :4], l, 0.5), "logits have 4 classes"),
    (lambda l, z: label_mapping_keep(z, l, 0.5, seed=-1), "seed must be"),
    (lambda l, z: label_mapping_keep(z * np.nan, l, 0.5), "NaN"),
    (lambda l, z: feature_mapping_keep(np.ones((10, 3)), np.ones((4, 2)), 0.5), "same width"),
    (lambda l, z: feature_mapping_keep(np.ones((10, 3)), np.ones((4, 3)), 0.5, clusters=0), "at least 1"),
    (lambda l, z: select_for_target(*planted_images(), "cluster", 0.5), "Unknown method"),
    (lambda l, z: keep_groups(l, np.ones(3), 0.5), "integers in 0..2"),
])
def test_bad_input_is_one_sentence(call, phrase):
    labels, logits = planted_logits()
    with pytest.raises(PruneError, match=phrase) as e:
        call(labels, logits)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


def _npz(tmp_path):
    src, tgt = planted_images()
    np.savez(tmp_path / "src.npz", x=src.x, y=src.y)
    np.savez(tmp_path / "tgt.npz", x=tgt.x)
    return tmp_path / "src.npz", tmp_path / "tgt.npz", src


def test_cli_writes_a_keep_file(tmp_path):
    from tests.conftest import invoke

    s, t, src = _npz(tmp_path)
    out = tmp_path / "keep.parquet"
    code, stdout, err = invoke("data", "select-for-target", s, "--target", t, "--method", "label", "--keep",
                               str(2 / 6), "--steps", "60", "--out", out, "--quiet")
    assert code == 0, err
    idx, meta = load_keep(out, n=len(src), fingerprint=src.fingerprint())
    assert np.array_equal(idx, np.flatnonzero(np.isin(src.y, PLANTED)))
    assert meta["strategy"] == "dp4tl-label" and meta["recipe"]["method"] == "label" and "kept 80 of 240" in stdout


def test_cli_bad_input_exit_2_nothing_written(tmp_path):
    from tests.conftest import error_line, invoke

    s, t, _ = _npz(tmp_path)
    out = tmp_path / "keep.parquet"
    for args, phrase in [(["--method", "clusters", "--keep", "0.3"], "Unknown method"),
                         (["--keep", "0"], "keep fraction must be in (0, 1]"),
                         (["--keep", "1.5"], "keep fraction must be in (0, 1]"),
                         (["--keep", "0.3", "--clusters", "0", "--method", "feature"],
                          "--clusters must be at least 1")]:
        code, _, err = invoke("data", "select-for-target", s, "--target", t, *args, "--out", out, "--quiet")
        assert code == 2 and phrase in error_line(err), (args, err)
        assert not out.exists()


def test_cli_shared_options_recipe_and_overwrite(tmp_path):
    import re

    from tests.conftest import invoke

    code, out, _ = invoke("data", "select-for-target", "--help")
    text = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", out))
    assert code == 0 and all(f in text for f in ("--out", "--overwrite", "--recipe", "--seed", "--quiet"))
    s, t, src = _npz(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: feature\nkeep: 0.25\nclusters: 6\ntarget-clusters: 2\nsteps: 30\n")
    out = tmp_path / "keep.parquet"
    args = ("data", "select-for-target", s, "--target", t, "--recipe", recipe, "--out", out, "--quiet")
    code, _, err = invoke(*args)
    assert code == 0, err
    idx, meta = load_keep(out, n=len(src))
    assert len(idx) == 60 and meta["strategy"] == "dp4tl-feature" and meta["recipe"]["clusters"] == 6
    code, _, err = invoke(*args)
    assert code == 2 and "--overwrite" in err  # an existing output is never replaced silently
    assert invoke(*args, "--overwrite", "--keep", "0.5")[0] == 0 and len(load_keep(out)[0]) == 120
