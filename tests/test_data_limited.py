"""The data-limited protocol's pieces: the validation split for early stopping (never the test set), early stopping
itself, the embedding cache (reused; invalidated when the encoder changes), the SimCLR encoder behind the
self-supervised prototypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.data import TrainConfig, load_dataset, train_subset
from prunekit.data.select import validation_split
from prunekit.data.train import accuracy, features, fit
from prunekit.errors import PruneError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", "test")


def test_validation_split_is_stratified_disjoint_and_seeded(digits):
    tr, _ = digits
    pool, val = validation_split(tr.y, 100, seed=3)
    assert len(val) == 100 and len(pool) + len(val) == len(tr)
    assert not np.intersect1d(pool, val).size
    counts = np.bincount(tr.y[val], minlength=10)
    assert counts.max() - counts.min() <= 1  # digits' classes are near balanced: 10 each
    p2, v2 = validation_split(tr.y, 100, seed=3)
    assert np.array_equal(v2, val) and not np.array_equal(validation_split(tr.y, 100, seed=4)[1], val)
    for bad in (0, len(tr), -5):
        with pytest.raises(PruneError, match="validation split"):
            validation_split(tr.y, bad)


def test_early_stopping_never_sees_the_test_set(digits):
    """Model selection reads the validation split only: scrambling the test labels changes nothing but the
    reported accuracy, and a validation split that overlaps the kept subset is refused."""
    tr, te = digits
    pool, val = validation_split(tr.y, 150, seed=0)
    keep = pool[:600]
    cfg = TrainConfig(model="mlp", steps=120, lr=5e-3)
    a = train_subset(tr, keep, cfg, test=te, val=val)
    scrambled = te.subset(np.arange(len(te)))
    scrambled.y = np.random.default_rng(0).permutation(te.y)
    b = train_subset(tr, keep, cfg, test=scrambled, val=val)
    for (k, va), vb in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.equal(va, vb), k
    assert a["best_epoch"] == b["best_epoch"] and a["test_accuracy"] > 0.8 and b["test_accuracy"] < 0.3
    with pytest.raises(PruneError, match="share no example"):
        train_subset(tr, keep, cfg, test=te, val=np.concatenate([val, keep[:3]]))
    out = train_subset(tr, None, cfg, val=val)  # everything but the validation split
    assert out["kept"] == len(tr) - len(val)


def test_early_stopping_keeps_the_best_checked_epoch():
    tr = load_dataset("digits")
    x, y = features(tr), torch.from_numpy(tr.y)
    xv, yv = x[-200:], y[-200:]
    m = fit(x[:-200], y[:-200], 10, TrainConfig(model="linear", epochs=12, lr=2e-2), val=(xv, yv))
    info = m.fit_info
    assert 1 <= info["best_epoch"] <= info["epochs_run"] == 12
    assert accuracy(m, xv, yv) == pytest.approx(info["val_accuracy"])
    # patience: with a learning rate too small to move, accuracy stops improving and the run ends early
    m = fit(x[:-200], y[:-200], 10, TrainConfig(model="linear", epochs=30, lr=1e-9, patience=2), val=(xv, yv))
    assert m.fit_info["epochs_run"] == 3 and m.fit_info["best_epoch"] == 1


def test_embedding_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    from prunekit.data import embed as E
    from prunekit.data.ssl import SSLConfig

    ds = load_dataset("digits").subset(np.arange(120))
    calls = []
    real = E._embed

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(E, "_embed", counting)
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "pk"))
    ssl = SSLConfig(steps=3, batch_size=32, width=4, proj_dim=8)
    z1 = E.embed(ds, "simclr", ssl=ssl)
    z2 = E.embed(ds, "simclr", ssl=ssl)
    assert calls == ["simclr"] and np.array_equal(z1, z2)  # the second call read the cache
    files = sorted((tmp_path / "pk" / "embeddings").glob("simclr-*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0], allow_pickle=False), z1)
    # another encoder (other weights: another seed) is another cache entry, computed afresh
    z3 = E.embed(ds, "simclr", ssl=ssl.model_copy(update={"seed": 1}))
    assert calls == ["simclr", "simclr"] and not np.allclose(z1, z3)
    assert len(list((tmp_path / "pk" / "embeddings").glob("simclr-*.npy"))) == 2
    # the same encoder with changed weights on disk is not the same encoder either
    import safetensors.torch as st

    enc_file = next((tmp_path / "pk" / "ssl").glob("simclr-*/encoder.safetensors"))
    state = st.load_file(str(enc_file))
    st.save_file({k: (v + 0.5 if v.is_floating_point() and v.dim() > 1 else v) for k, v in state.items()},
                 str(enc_file))
    before = len(calls)
    E.embed(ds, "simclr", ssl=ssl)
    E.embed(ds, "simclr", ssl=ssl.model_copy(update={"seed": 1}))
    assert len(calls) - before == 1  # exactly one of the two encoders changed
    # pca is not cached unless asked; with cache=True it is
    E.embed(ds, "pca", dim=8)
    E.embed(ds, "pca", dim=8)
    assert calls[-2:] == ["pca", "pca"]
    E.embed(ds, "pca", dim=8, cache=True)
    n = len(calls)
    E.embed(ds, "pca", dim=8, cache=True)
    assert len(calls) == n


def test_nt_xent_rewards_matching_views():
    from prunekit.data.ssl import nt_xent

    z = torch.eye(8)[:6] * 5
    assert nt_xent(z, z.clone(), 0.5) < nt_xent(z, z.roll(1, 0), 0.5) - 1.0


def test_augment_keeps_range_and_shape():
    from prunekit.data.ssl import augment

    x = torch.rand(5, 1, 28, 28)
    v = augment(x, torch.Generator().manual_seed(0))
    assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1 and not torch.allclose(v, x)


def test_simclr_encoder_is_deterministic_cached_and_learns(tmp_path):
    from prunekit.data.ssl import SSLConfig, encoder_for, fingerprint, train_encoder

    ds = load_dataset("digits").subset(np.arange(300))
    cfg = SSLConfig(steps=40, batch_size=64, width=8, proj_dim=16, lr=5e-3)
    a = train_encoder(ds, cfg)
    b = train_encoder(ds, cfg)
    assert fingerprint(a) == fingerprint(b)
    c = encoder_for(ds, cfg, cache=tmp_path)
    d = encoder_for(ds, cfg, cache=tmp_path)  # loaded, not trained again
    assert fingerprint(c) == fingerprint(d) == fingerprint(a)
    assert (next(tmp_path.glob("simclr-*")) / "encoder.json").exists()
    from prunekit.data.datasets import DataSet

    with pytest.raises(PruneError, match="images"):
        train_encoder(DataSet("v", "array", np.zeros((10, 4), np.float32)), cfg)
    with pytest.raises(PruneError, match="batch"):
        SSLConfig(batch_size=1).check()


def test_prototype_score_with_the_simclr_encoder(tmp_path, monkeypatch):
    from prunekit.data import ScoreConfig, score

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    ds = load_dataset("digits").subset(np.arange(200))
    res = score(ds, "prototype", ScoreConfig(encoder="simclr", clusters=5, ssl_steps=5))
    assert res.info["encoder"] == "simclr" and res.values.shape == (200,)
    assert np.isfinite(res.values).all() and res.values.min() >= 0
    with pytest.raises(PruneError, match="embeds images"):
        from prunekit.data.embed import resolve
        from prunekit.data.datasets import DataSet

        resolve(DataSet("a", "array", np.zeros((3, 2), np.float32)), "simclr")


def test_cli_train_with_early_stopping(tmp_path):
    """`prunekit data train --val-size`: the validation examples come from outside the subset, the metrics say
    which epoch was kept; a split larger than what is left, or --patience alone, is one sentence and exit 2."""
    import json

    from prunekit.data import save_keep
    from tests.conftest import invoke

    ds = load_dataset("digits")
    keep = np.arange(0, 600)
    k = tmp_path / "keep.parquet"
    save_keep(k, keep, len(ds), {"dataset": ds.name, "split": "train", "strategy": "random",
                                 "fingerprint": ds.fingerprint()})
    m = tmp_path / "m.json"
    rc, out, err = invoke("data", "train", "digits", "--subset", k, "--model", "mlp", "--epochs", "6",
                          "--val-size", "200", "--patience", "3", "--out", m, "--quiet")
    assert rc == 0, err
    metrics = json.loads(m.read_text())["metrics"]
    assert metrics["kept"] == 600 and 1 <= metrics["best_epoch"] <= metrics["epochs_run"] <= 6
    assert "early stopping on 200 held-out examples" in out
    for args, phrase in ((["--val-size", "748"], "smaller --val-size"), (["--val-size", "0"], "at least 1"),
                         (["--patience", "2"], "add --val-size")):
        m2 = tmp_path / "bad.json"
        rc, _, err = invoke("data", "train", "digits", "--subset", k, "--model", "mlp", "--epochs", "1", *args,
                            "--out", m2, "--quiet")
        assert rc == 2 and phrase in err and not m2.exists(), (args, err)
